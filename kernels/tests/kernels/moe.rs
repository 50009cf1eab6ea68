//! Grouped expert FFN against the per-expert f64 reference (bound 1e-5 relative to ‖ref‖).

use super::common::*;
use shardseek_kernels::cpu::Isa;
use shardseek_kernels::moe::{self, Combine, ExpertWeights, Group};
use shardseek_kernels::sampling::Rng;

#[test]
fn grouped_ffn_matches_reference_on_skewed_groups() {
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        let (hidden, inter) = (200, 136);
        let owned = random_experts(&mut rng, 5, hidden, inter, 3);
        let experts = expert_views(&owned);
        // Skewed: one large group (prefill path), singles and an empty one (decode path).
        let sizes = [(4, 1), (0, 3), (2, 0), (1, 40), (3, 17)];
        let (groups, r) = groups_of(&sizes);
        let rows = r + 2; // two rows belong to no group and must stay untouched
        let x = randv(&mut rng, rows * hidden);
        let w = randv(&mut rng, rows);
        let y0 = randv(&mut rng, rows * hidden);
        for combine in [Combine::Store, Combine::Accumulate] {
            for rw in [None, Some(&w[..])] {
                let mut want = y0.clone();
                moe::reference::grouped_ffn(&x, hidden, &groups, &experts, rw, combine, &mut want);
                for isa in Isa::ALL {
                    if !isa.available() {
                        continue;
                    }
                    let mut y = y0.clone();
                    moe::grouped_ffn_with(isa, &x, hidden, &groups, &experts, rw, combine, &mut y)
                        .unwrap();
                    let e = rel_err(&y, &want);
                    assert!(
                        e < 1e-5,
                        "{isa:?} {combine:?} weights={}: {e}",
                        rw.is_some()
                    );
                    assert_eq!(y[r * hidden..], y0[r * hidden..]);
                }
            }
        }
    }
}

#[test]
fn grouped_ffn_rejects_bad_groups() {
    let mut rng = Rng::new(3);
    let ws: Vec<OwnedWeight> = vec![
        OwnedWeight::random(&mut rng, 8, 16, Kind::F32),
        OwnedWeight::random(&mut rng, 8, 16, Kind::F32),
        OwnedWeight::random(&mut rng, 16, 8, Kind::F32),
    ];
    let e = [ExpertWeights {
        gate: ws[0].view(),
        up: ws[1].view(),
        down: ws[2].view(),
    }];
    let x = vec![0f32; 3 * 16];
    let mut y = vec![0f32; 3 * 16];
    let overlap = [
        Group {
            expert: 0,
            rows: 0..2,
        },
        Group {
            expert: 0,
            rows: 1..3,
        },
    ];
    assert!(moe::grouped_ffn(&x, 16, &overlap, &e, None, Combine::Store, &mut y).is_err());
    let missing = [Group {
        expert: 1,
        rows: 0..2,
    }];
    assert!(moe::grouped_ffn(&x, 16, &missing, &e, None, Combine::Store, &mut y).is_err());
    let oob = [Group {
        expert: 0,
        rows: 2..4,
    }];
    assert!(moe::grouped_ffn(&x, 16, &oob, &e, None, Combine::Store, &mut y).is_err());
}
