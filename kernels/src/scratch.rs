//! Per-thread f32 buffers that outlive the call using them, so the operations of a step stop
//! allocating once a step of the same shape has run (issue 9: no allocation on the hot path).
//!
//! A large `vec![0.0; n]` is a fresh `mmap` and a page fault per 4 KiB on first touch; a
//! decode step at batch 32 asked for megabytes of such buffers per layer. Here a buffer taken
//! with [`take`] goes back to its thread's free list when dropped and the next [`take`] on that
//! thread reuses it. Buffers come in power-of-two size classes and never grow, so once a
//! thread has held as many buffers of each class at a time as a step of a shape needs, later
//! steps of that shape allocate nothing on it.
//!
//! The free list is per thread (no lock): a kernel-team task that takes a buffer gets one of
//! its own worker's. Buffers may be taken while others are held (nesting); each is a separate
//! allocation. A buffer may be dropped on another thread than the one that took it (an operand
//! prepared in a task and dropped by the caller): the dropping thread keeps it, and what a
//! thread holds beyond [`KEEP`] goes to one shared list that threads short of a buffer of a
//! class take from, so buffers that travel one way come back instead of being freed and
//! allocated again.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::thread::LocalKey;

/// Element types with a free list of their own on every thread, and one shared.
pub trait Pooled: Copy + Default + Send + 'static {
    #[doc(hidden)]
    fn free() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
    #[doc(hidden)]
    fn shared() -> &'static Mutex<Vec<Vec<Self>>>;
}

macro_rules! pooled {
    ($t:ty, $name:ident, $shared:ident) => {
        thread_local! {
            static $name: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
        }
        static $shared: Mutex<Vec<Vec<$t>>> = Mutex::new(Vec::new());
        impl Pooled for $t {
            fn free() -> &'static LocalKey<RefCell<Vec<Vec<$t>>>> {
                &$name
            }
            fn shared() -> &'static Mutex<Vec<Vec<$t>>> {
                &$shared
            }
        }
    };
}

pooled!(f32, FREE_F32, SHARED_F32);
pooled!(usize, FREE_USIZE, SHARED_USIZE);
pooled!(u16, FREE_U16, SHARED_U16);

/// Most buffers of one type the shared list keeps: above the most a step holds at once (a
/// grouped-MoE call holds one operand buffer per expert group and phase), so that buffers
/// travelling between threads are kept, not freed and allocated again.
const KEEP_SHARED: usize = 1024;

/// The capacity of the buffers that serve a request of `len` values: the next power of two
/// (at least 64). Requests of one class share buffers and a buffer never grows, so a thread
/// that has once held as many buffers of a class as a step needs at a time never allocates
/// for that class again, whatever order the requests come in.
fn class_of(len: usize) -> usize {
    len.max(64).next_power_of_two()
}

/// Index of a buffer of `class`, if any.
fn of_class<T>(list: &[Vec<T>], class: usize) -> Option<usize> {
    list.iter()
        .position(|b| b.capacity() >= class && b.capacity() < 2 * class)
}

/// Most buffers of one type a thread keeps to itself (an MLA task holds eight at once); the
/// rest go to the shared list.
const KEEP: usize = 16;

/// A buffer from this thread's free list; back on the list when dropped.
pub struct Scratch<T: Pooled = f32> {
    buf: Vec<T>,
}

/// A buffer of `len` default values (zeros), reusing a free buffer of its size class.
pub fn take<T: Pooled>(len: usize) -> Scratch<T> {
    filled(len, T::default())
}

/// A buffer of `len` copies of `v`.
pub fn filled<T: Pooled>(len: usize, v: T) -> Scratch<T> {
    let mut buf = pop::<T>(len);
    buf.clear();
    buf.resize(len, v);
    Scratch { buf }
}

/// A buffer of `len` values of which only those past the reused buffer's old length are set
/// (to the default): for a caller that writes every element anyway, and would otherwise pay
/// for clearing it.
pub fn stale<T: Pooled>(len: usize) -> Scratch<T> {
    let mut buf = pop::<T>(len);
    buf.resize(len, T::default());
    Scratch { buf }
}

/// A free buffer for `len` values: one of its class from this thread's list, else from the
/// shared list, else a new one.
fn pop<T: Pooled>(len: usize) -> Vec<T> {
    let class = class_of(len);
    T::free()
        .try_with(|f| {
            let mut f = f.borrow_mut();
            of_class(&f, class).map(|i| f.swap_remove(i))
        })
        .ok()
        .flatten()
        .or_else(|| {
            let mut s = T::shared().lock().unwrap_or_else(|p| p.into_inner());
            of_class(&s, class).map(|i| s.swap_remove(i))
        })
        .unwrap_or_else(|| {
            // The first buffer of a class anywhere, or more of it held at once than ever: one
            // spare per other thread goes to the shared list. A kernel thread that meets the
            // class later (a team worker that seldom wins a task of a small operation) then
            // takes a spare instead of allocating in the middle of a warm step.
            let mut s = T::shared().lock().unwrap_or_else(|p| p.into_inner());
            for _ in 0..crate::pool::threads() {
                if s.len() < KEEP_SHARED {
                    s.push(Vec::with_capacity(class));
                }
            }
            Vec::with_capacity(class)
        })
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.buf
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() == 0 {
            return;
        }
        // try_with: a buffer dropped while the thread's locals are torn down is freed.
        let rest = T::free()
            .try_with(|f| {
                let mut f = f.borrow_mut();
                if f.len() < KEEP {
                    f.push(buf);
                    None
                } else {
                    Some(buf)
                }
            })
            .ok()
            .flatten();
        if let Some(buf) = rest {
            let mut s = T::shared().lock().unwrap_or_else(|p| p.into_inner());
            if s.len() < KEEP_SHARED {
                s.push(buf);
            }
        }
    }
}

/// An empty vector reusing `v`'s allocation for another element type of the same size and
/// alignment, e.g. a list of borrowed views kept from call to call under a shorter lifetime
/// (the standard library collects in place when the layouts match; no unsafe code).
pub fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_and_reused() {
        let p = {
            let mut a = take::<f32>(100);
            assert!(a.iter().all(|&v| v == 0.0));
            a.fill(3.0);
            a.as_ptr()
        };
        let b = take::<f32>(90);
        assert_eq!(b.len(), 90);
        assert!(
            b.iter().all(|&v| v == 0.0),
            "a reused buffer must be zeroed"
        );
        assert_eq!(b.as_ptr(), p, "the free buffer was not reused");
        // Nested buffers are distinct.
        let c = take::<f32>(10);
        assert_ne!(b.as_ptr(), c.as_ptr());
    }

    #[test]
    fn buffers_serve_their_size_class() {
        let (small, big) = {
            let a = take::<usize>(10);
            let b = take::<usize>(1000);
            (a.as_ptr(), b.as_ptr())
        };
        let x = take::<usize>(600);
        assert_eq!(x.as_ptr(), big, "600 and 1000 are both of the 1024 class");
        let y = take::<usize>(5);
        assert_eq!(y.as_ptr(), small);
        // Another class: a new buffer, not a grown one.
        let z = take::<usize>(3000);
        assert!(z.as_ptr() != big && z.as_ptr() != small);
    }

    #[test]
    fn stale_buffers_keep_old_values_and_a_buffer_dropped_elsewhere_comes_back() {
        let p = {
            let mut a = take::<f32>(200);
            a.fill(7.0);
            a.as_ptr()
        };
        let s = stale::<f32>(150);
        assert_eq!(s.as_ptr(), p);
        assert!(s.iter().all(|&v| v == 7.0), "stale does not clear");
        // Dropped on another thread beyond its own list's room: that thread passes it to the
        // shared list, where any thread short of a buffer of the class takes it.
        let held: Vec<Scratch<u16>> = (0..KEEP + 1).map(|_| take::<u16>(5000)).collect();
        let last = held.last().unwrap().as_ptr() as usize;
        std::thread::spawn(move || drop(held)).join().unwrap();
        let shared = u16::shared().lock().unwrap();
        assert!(
            shared.iter().any(|b| b.as_ptr() as usize == last),
            "the buffer beyond the other thread's room is in the shared list"
        );
    }

    #[test]
    fn recycle_keeps_the_allocation() {
        let mut v: Vec<&u64> = Vec::with_capacity(64);
        let x = 5u64;
        v.push(&x);
        let p = v.as_ptr() as usize;
        let w: Vec<&u64> = recycle(v);
        assert!(w.is_empty());
        assert_eq!(w.as_ptr() as usize, p);
        assert!(w.capacity() >= 64);
    }
}
