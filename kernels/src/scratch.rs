//! Per-thread f32 buffers that outlive the call using them, so the operations of a step stop
//! allocating once a step of the same shape has run (issue 9: no allocation on the hot path).
//!
//! A large `vec![0.0; n]` is a fresh `mmap` and a page fault per 4 KiB on first touch; a
//! decode step at batch 32 asked for megabytes of such buffers per layer. Here a buffer taken
//! with [`take`] goes back to its thread's free list when dropped and the next [`take`] on that
//! thread reuses it. Buffers only grow, so after one step of a shape every later step of that
//! shape finds a buffer large enough at each point where it asks for one.
//!
//! The free list is per thread (no lock): a kernel-team task that takes a buffer gets one of
//! its own worker's. Buffers may be taken while others are held (nesting); each is a separate
//! allocation. A buffer may be dropped on another thread than the one that took it (an operand
//! prepared in a task and dropped by the caller): the dropping thread keeps it, and what a
//! thread holds beyond [`KEEP`] goes to one shared list that threads short of a fitting buffer
//! take from, so buffers that travel one way come back instead of being freed and allocated
//! again.

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

/// Index of the smallest buffer with room for `len`, if any.
fn best_fit<T>(list: &[Vec<T>], len: usize) -> Option<usize> {
    list.iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i)
}

/// Index of the largest buffer, if any.
fn largest<T>(list: &[Vec<T>]) -> Option<usize> {
    list.iter()
        .enumerate()
        .max_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i)
}

/// Most buffers of one type a thread keeps to itself; the rest go to the shared list. Few, so
/// that a thread that rarely runs some operation (a rayon worker that seldom steals an MLA
/// task) finds buffers of its sizes in the shared list instead of allocating them.
const KEEP: usize = 4;

/// A buffer from this thread's free list; back on the list when dropped.
pub struct Scratch<T: Pooled = f32> {
    buf: Vec<T>,
}

/// A buffer of `len` default values (zeros). Reuses the smallest free buffer with room for
/// `len` (or grows the largest free one), so buffers of different sizes settle where they are
/// needed.
pub fn take<T: Pooled>(len: usize) -> Scratch<T> {
    filled(len, T::default())
}

/// A buffer of no values that holds no memory (and goes to no list when dropped): the
/// placeholder of an operand part that is not needed.
pub fn empty<T: Pooled>() -> Scratch<T> {
    Scratch { buf: Vec::new() }
}

/// A buffer of `len` copies of `v`: the thread's best fit, else the shared list's, else the
/// thread's (or the shared list's) largest buffer grown, else a new one.
pub fn filled<T: Pooled>(len: usize, v: T) -> Scratch<T> {
    let local = T::free()
        .try_with(|f| {
            let mut f = f.borrow_mut();
            best_fit(&f, len).map(|i| f.swap_remove(i))
        })
        .ok()
        .flatten();
    let mut buf = local
        .or_else(|| {
            let mut s = T::shared().lock().unwrap_or_else(|p| p.into_inner());
            best_fit(&s, len).map(|i| s.swap_remove(i))
        })
        .or_else(|| {
            T::free()
                .try_with(|f| {
                    let mut f = f.borrow_mut();
                    largest(&f).map(|i| f.swap_remove(i))
                })
                .ok()
                .flatten()
        })
        .or_else(|| {
            let mut s = T::shared().lock().unwrap_or_else(|p| p.into_inner());
            largest(&s).map(|i| s.swap_remove(i))
        })
        .unwrap_or_default();
    buf.clear();
    buf.resize(len, v);
    Scratch { buf }
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
        let b = take::<f32>(50);
        assert_eq!(b.len(), 50);
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
    fn the_smallest_fitting_buffer_is_taken() {
        let (small, big) = {
            let a = take::<usize>(10);
            let b = take::<usize>(1000);
            (a.as_ptr(), b.as_ptr())
        };
        let x = take::<usize>(500);
        assert_eq!(x.as_ptr(), big);
        let y = take::<usize>(5);
        assert_eq!(y.as_ptr(), small);
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
