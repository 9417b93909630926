//! Per-sender sequence numbers: what lets the recipient notice that the relay
//! dropped, reordered or replayed messages.
//!
//! Every envelope carries, inside its signed part, the sender's count of
//! messages to this recipient (1, 2, 3, …). For each sender agentd keeps the
//! highest number it has seen, the numbers it skipped, and which key signed
//! them:
//!
//! ```text
//! seq = highest + 1          in order
//! seq > highest + 1          gap: highest+1 ..= seq-1 are missing (reported)
//! seq ≤ highest, skipped     late: a missing one arrived after all
//! seq ≤ highest, not skipped replay: refused
//! ```
//!
//! A sender who starts over (a new installation: new key, numbers from 1) is
//! recognised by the key: numbers at or below the highest that come signed
//! by a different key than the earlier ones start a new count instead of
//! being refused as replays. A key rotation keeps counting upwards, so it
//! changes nothing.
//!
//! This module is pure bookkeeping; `store` keeps the state in the same
//! transaction as the inbox.

use serde::{Deserialize, Serialize};

/// Most skipped ranges remembered per sender; beyond it the oldest go.
const MAX_MISSING_RANGES: usize = 64;

/// What agentd remembers of one sender's numbering.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqState {
    /// Highest number delivered.
    pub highest: u64,
    /// SHA-256 of the key that signed the latest message.
    pub signer: [u8; 32],
    /// Skipped numbers, as inclusive ranges, oldest first.
    pub missing: Vec<(u64, u64)>,
}

/// How one message's number fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The next number.
    InOrder,
    /// Numbers `first..=last` were skipped.
    Gap {
        /// First missing number.
        first: u64,
        /// Last missing number.
        last: u64,
    },
    /// A number skipped earlier arrived.
    Late,
    /// A number already delivered: the relay replays it.
    Replay {
        /// The highest number seen from this sender.
        highest: u64,
    },
}

impl Verdict {
    /// How many messages the gap holds (0 unless `Gap`).
    pub fn missing(self) -> u64 {
        match self {
            Verdict::Gap { first, last } => last - first + 1,
            _ => 0,
        }
    }
}

/// Judge `seq`, signed by `signer`, against `state`; returns the verdict and
/// the state to keep if the message is accepted (a replay keeps the old one).
pub fn check(state: Option<&SeqState>, seq: u64, signer: [u8; 32]) -> (Verdict, SeqState) {
    let fresh = |seq: u64| {
        let mut s = SeqState {
            highest: seq,
            signer,
            missing: Vec::new(),
        };
        if seq > 1 {
            s.missing.push((1, seq - 1));
            let v = Verdict::Gap {
                first: 1,
                last: seq - 1,
            };
            return (v, s);
        }
        (Verdict::InOrder, s)
    };
    let Some(state) = state else {
        return fresh(seq);
    };
    if seq > state.highest {
        let mut next = state.clone();
        next.highest = seq;
        next.signer = signer;
        if seq == state.highest + 1 {
            return (Verdict::InOrder, next);
        }
        let (first, last) = (state.highest + 1, seq - 1);
        next.missing.push((first, last));
        if next.missing.len() > MAX_MISSING_RANGES {
            next.missing.remove(0);
        }
        return (Verdict::Gap { first, last }, next);
    }
    if let Some(i) = state
        .missing
        .iter()
        .position(|&(a, b)| (a..=b).contains(&seq))
    {
        let mut next = state.clone();
        let (a, b) = next.missing.remove(i);
        if seq < b {
            next.missing.insert(i, (seq + 1, b));
        }
        if a < seq {
            next.missing.insert(i, (a, seq - 1));
        }
        return (Verdict::Late, next);
    }
    if signer != state.signer {
        // The sender started over with a new key (a new installation).
        return fresh(seq);
    }
    (
        Verdict::Replay {
            highest: state.highest,
        },
        state.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; 32] = [1; 32];
    const K2: [u8; 32] = [2; 32];

    fn run(seqs: &[(u64, [u8; 32])]) -> Vec<Verdict> {
        let mut state: Option<SeqState> = None;
        let mut out = Vec::new();
        for &(seq, key) in seqs {
            let (v, next) = check(state.as_ref(), seq, key);
            out.push(v);
            state = Some(next);
        }
        out
    }

    #[test]
    fn in_order_gaps_late_and_replays() {
        use Verdict::*;
        assert_eq!(
            run(&[
                (1, K1),
                (2, K1),
                (5, K1),
                (4, K1),
                (4, K1),
                (2, K1),
                (3, K1),
                (6, K1)
            ]),
            [
                InOrder,
                InOrder,
                Gap { first: 3, last: 4 },
                Late,
                Replay { highest: 5 },
                Replay { highest: 5 },
                Late,
                InOrder
            ]
        );
    }

    #[test]
    fn first_contact_after_a_drop_is_a_gap() {
        assert_eq!(run(&[(3, K1)]), [Verdict::Gap { first: 1, last: 2 }]);
        assert_eq!(Verdict::Gap { first: 1, last: 2 }.missing(), 2);
    }

    #[test]
    fn a_rotated_key_keeps_counting_and_a_new_installation_starts_over() {
        use Verdict::*;
        // Rotation: numbers go on upwards under the new key.
        assert_eq!(
            run(&[(1, K1), (2, K2), (3, K2)]),
            [InOrder, InOrder, InOrder]
        );
        // Reinstalled: a new key starts from 1 again.
        assert_eq!(
            run(&[(1, K1), (2, K1), (1, K2), (2, K2)]),
            [InOrder, InOrder, InOrder, InOrder]
        );
        // The same key going back is a replay.
        assert_eq!(
            run(&[(1, K1), (2, K1), (1, K1)]),
            [InOrder, InOrder, Replay { highest: 2 }]
        );
    }

    #[test]
    fn missing_ranges_stay_bounded() {
        let mut state: Option<SeqState> = None;
        for i in 0..500u64 {
            let (_, next) = check(state.as_ref(), i * 2 + 1, K1);
            state = Some(next);
        }
        assert!(state.unwrap().missing.len() <= MAX_MISSING_RANGES);
    }
}
