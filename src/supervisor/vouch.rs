//! `ckpt run --restore-check auto` (the default): which check each launch's restore
//! checkpoint gets, from what the job's client has shown.
//!
//! A client sends `restore_verified` once its verifying reads (size and checksum of every
//! byte, before the bytes reach the job) have covered every member of the checkpoint it
//! restores (a rank: its own shard). When every process that restores (every rank) has sent
//! it, the job is known to read its checkpoint through the client only: that is recorded in
//! `DIR/.ckpt/restore-check.json` with the command, and the next launches of the same command
//! get the light check (manifest and sizes; the client's checks are then the only read). A
//! light launch that ends without every rank's message drops the record (the next launch is
//! checked in full), and one that publishes a checkpoint before it has the messages has its
//! restore checkpoint verified in full first (see `Supervisor::vouch_net`).
//!
//! Pure bookkeeping: the file I/O is at the edge ([`load`], [`store`]), the decisions here
//! are unit-tested without processes.

use std::collections::BTreeSet;
use std::ffi::OsString;

use serde::{Deserialize, Serialize};

use crate::protocol::{RestoreCheck, RestoreCheckMode};

/// The record's file name in `DIR/.ckpt`.
pub const FILE: &str = "restore-check.json";
/// The marker of a light-checked launch whose processes have not all vouched yet, in
/// `DIR/.ckpt`: written before such a launch, removed once they have or the launch ended. A
/// marker found at start-up means a supervisor died during one (see `recover_light_launch`).
pub const MARKER: &str = "light-launch.json";
/// Largest record read back (a command line's worth).
const LIMIT: u64 = 1 << 20;

/// What `DIR/.ckpt/restore-check.json` holds: a launch of `command` restored checkpoint
/// `seq` (`ranks` processes) wholly through verifying client reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub v: u32,
    pub command: Vec<String>,
    pub seq: u64,
    pub ranks: u32,
    pub t_ms: u64,
}

/// What `DIR/.ckpt/light-launch.json` holds: a light-checked launch of `command` restoring
/// `seq` started at `t_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    pub v: u32,
    pub seq: u64,
    pub t_ms: u64,
    /// The launch's command (only its record is void).
    pub command: Vec<String>,
}

/// One launch that restores a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Launch {
    seq: u64,
    how: RestoreCheck,
    /// Processes that must send `restore_verified` (the checkpoint's `world_size`, else 1).
    need: u32,
    got: BTreeSet<u32>,
    /// The restore checkpoint was verified in full after the launch (the net): nothing more
    /// to check for it.
    checked_late: bool,
}

/// What a `restore_verified` message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// Not taken: why.
    Ignored(String),
    /// Counted; more ranks to come (`got` of `need`).
    Counted { got: u32, need: u32 },
    /// Every rank has sent it: the record to write (`None`: it already says so).
    Complete(Option<Record>),
    /// Again from a rank already counted.
    Repeat,
}

/// The `--restore-check` bookkeeping of one `ckpt run`.
#[derive(Debug)]
pub struct Vouch {
    mode: RestoreCheckMode,
    command: Vec<String>,
    record: Option<Record>,
    launch: Option<Launch>,
}

/// The command as the record keeps it (lossy UTF-8: only compared).
pub fn command_of(cmd: &[OsString]) -> Vec<String> {
    cmd.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

impl Vouch {
    /// `record`: what the directory's file held (`None`: none, or unreadable).
    pub fn new(mode: RestoreCheckMode, command: Vec<String>, record: Option<Record>) -> Vouch {
        Vouch {
            mode,
            command,
            record,
            launch: None,
        }
    }

    /// Whether the record vouches for this run's command.
    fn trusted(&self) -> bool {
        self.record
            .as_ref()
            .is_some_and(|r| r.v == 1 && r.command == self.command)
    }

    /// The check for the next launch's restore checkpoint. `criu`: `--transparent`, whose
    /// images CRIU restores without any check: always in full.
    pub fn check(&self, criu: bool) -> RestoreCheck {
        match self.mode {
            _ if criu => RestoreCheck::Full,
            RestoreCheckMode::Full => RestoreCheck::Full,
            RestoreCheckMode::Client => RestoreCheck::Client,
            RestoreCheckMode::Auto if self.trusted() => RestoreCheck::Client,
            RestoreCheckMode::Auto => RestoreCheck::Full,
        }
    }

    /// How the next launch's checkpoint is checked and why, for the launch line.
    pub fn why(&self, criu: bool) -> String {
        match (self.mode, self.check(criu)) {
            (_, RestoreCheck::Full) if criu => "verified in full: a CRIU image".into(),
            (RestoreCheckMode::Full, _) => "verified in full: --restore-check full".into(),
            (RestoreCheckMode::Client, _) => {
                "read once, checked by the job's client: --restore-check client".into()
            }
            (_, RestoreCheck::Client) => format!(
                "read once, checked by the job's client, which verified all of checkpoint {} when it restored it",
                self.record.as_ref().map_or(0, |r| r.seq)
            ),
            (_, RestoreCheck::Full) => {
                "verified in full until the job's client shows that it checks its whole restore"
                    .into()
            }
        }
    }

    /// A launch starts: restoring `seq` (checked `how`; `ranks` processes restore it), or
    /// nothing.
    pub fn launched(&mut self, restore: Option<(u64, RestoreCheck, u32)>) {
        self.launch = restore.map(|(seq, how, ranks)| Launch {
            seq,
            how,
            need: ranks.max(1),
            got: BTreeSet::new(),
            checked_late: false,
        });
    }

    /// A `restore_verified` (already checked to come from the pid it names) for checkpoint
    /// `seq` from `rank`, at `t_ms`.
    pub fn heard(&mut self, seq: u64, rank: Option<u32>, t_ms: u64) -> Heard {
        let Some(l) = self.launch.as_mut() else {
            return Heard::Ignored("this launch restores no checkpoint".into());
        };
        if l.seq != seq {
            return Heard::Ignored(format!("this launch restores checkpoint {}", l.seq));
        }
        let r = match rank {
            None if l.need == 1 => 0,
            None => {
                return Heard::Ignored(format!(
                    "checkpoint {seq} has {} shards and the message names no rank",
                    l.need
                ))
            }
            Some(r) if r < l.need => r,
            Some(r) => {
                return Heard::Ignored(format!(
                    "rank {r} is not one of checkpoint {seq}'s {} shards",
                    l.need
                ))
            }
        };
        if !l.got.insert(r) {
            return Heard::Repeat;
        }
        let got = l.got.len() as u32;
        if got < l.need {
            return Heard::Counted { got, need: l.need };
        }
        let rec = Record {
            v: 1,
            command: self.command.clone(),
            seq,
            ranks: l.need,
            t_ms,
        };
        if self.trusted() {
            return Heard::Complete(None);
        }
        self.record = Some(rec.clone());
        Heard::Complete(Some(rec))
    }

    /// Whether every rank of the current launch has vouched.
    fn complete(l: &Launch) -> bool {
        l.got.len() as u32 >= l.need
    }

    /// The current launch's leader ended. Returns the reason to drop the record: a light
    /// launch that ended without every rank's message (the job did not, or not only, read
    /// its checkpoint through the client), when there is a record for this command.
    pub fn ended(&mut self) -> Option<String> {
        let l = self.launch.take()?;
        if l.how != RestoreCheck::Client || Self::complete(&l) || !self.trusted() {
            return None;
        }
        self.record = None;
        Some(format!(
            "the launch that restored checkpoint {} after the light check ended before its client verified every file of it ({} of {} processes did)",
            l.seq,
            l.got.len(),
            l.need
        ))
    }

    /// A checkpoint newer than the one the current launch restores was published: the
    /// checkpoint to verify in full now, when the launch was light-checked and its client has
    /// not vouched for all of it (the job may have read unverified bytes and saved what it
    /// computed from them). At most once per launch.
    pub fn net(&mut self) -> Option<u64> {
        let l = self.launch.as_mut()?;
        if l.how != RestoreCheck::Client || Self::complete(l) || l.checked_late {
            return None;
        }
        l.checked_late = true;
        Some(l.seq)
    }

    /// Drops the record when it is this command's (the net found a launch that did not vouch
    /// before it saved; a supervisor died during such a launch). Returns whether it did.
    pub fn forget(&mut self) -> bool {
        let ours = self.trusted();
        if ours {
            self.record = None;
        }
        ours
    }

    /// The checkpoint the current launch restores after the light check while not every
    /// process has vouched for it yet: kept from retention, and the reason for the marker.
    pub fn pending(&self) -> Option<u64> {
        self.launch
            .as_ref()
            .filter(|l| l.how == RestoreCheck::Client && !Self::complete(l) && !l.checked_late)
            .map(|l| l.seq)
    }

    /// The current launch's restore checkpoint and how it was checked.
    pub fn restoring(&self) -> Option<(u64, RestoreCheck)> {
        self.launch.as_ref().map(|l| (l.seq, l.how))
    }
}

/// Reads the record in `private` (`DIR/.ckpt`). Absent: `Ok(None)`. Anything else that is not
/// a record ckpt wrote (not a regular file, too big, not this JSON): `Err(why)`, and the
/// caller treats it as absent (full checks: the safe side).
pub fn load(private: &std::path::Path) -> Result<Option<Record>, String> {
    load_json(&private.join(FILE))
}

/// Reads the marker in `private`, as [`load`] reads the record.
pub fn load_marker(private: &std::path::Path) -> Result<Option<Marker>, String> {
    load_json(&private.join(MARKER))
}

fn load_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<Option<T>, String> {
    match crate::store::io::read_small(path, LIMIT) {
        Ok(b) => serde_json::from_slice::<T>(&b)
            .map(Some)
            .map_err(|e| format!("{} is not a file ckpt wrote ({e})", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Vec<String> {
        vec!["python3".into(), "train.py".into()]
    }

    fn rec(seq: u64, command: Vec<String>) -> Record {
        Record {
            v: 1,
            command,
            seq,
            ranks: 1,
            t_ms: 5,
        }
    }

    #[test]
    fn auto_is_full_until_a_record_for_this_command_then_light() {
        let v = Vouch::new(RestoreCheckMode::Auto, cmd(), None);
        assert_eq!(v.check(false), RestoreCheck::Full);
        let v = Vouch::new(RestoreCheckMode::Auto, cmd(), Some(rec(3, cmd())));
        assert_eq!(v.check(false), RestoreCheck::Client);
        assert!(v.why(false).contains("checkpoint 3"), "{}", v.why(false));
        assert_eq!(v.check(true), RestoreCheck::Full, "CRIU: always full");
        let other = Vouch::new(
            RestoreCheckMode::Auto,
            cmd(),
            Some(rec(3, vec!["./other".into()])),
        );
        assert_eq!(other.check(false), RestoreCheck::Full, "another command");
        let mut future = rec(3, cmd());
        future.v = 2;
        let v = Vouch::new(RestoreCheckMode::Auto, cmd(), Some(future));
        assert_eq!(
            v.check(false),
            RestoreCheck::Full,
            "a record of another version"
        );
    }

    #[test]
    fn full_and_client_modes_ignore_the_record_for_the_decision() {
        for r in [None, Some(rec(1, cmd()))] {
            let f = Vouch::new(RestoreCheckMode::Full, cmd(), r.clone());
            assert_eq!(f.check(false), RestoreCheck::Full);
            let c = Vouch::new(RestoreCheckMode::Client, cmd(), r);
            assert_eq!(c.check(false), RestoreCheck::Client);
            assert_eq!(c.check(true), RestoreCheck::Full);
        }
    }

    #[test]
    fn a_full_launch_whose_client_vouches_records_it_and_the_next_is_light() {
        let mut v = Vouch::new(RestoreCheckMode::Auto, cmd(), None);
        v.launched(Some((4, v.check(false), 1)));
        assert_eq!(
            v.heard(4, None, 9),
            Heard::Complete(Some(Record {
                v: 1,
                command: cmd(),
                seq: 4,
                ranks: 1,
                t_ms: 9
            }))
        );
        assert_eq!(v.heard(4, None, 9), Heard::Repeat);
        assert_eq!(v.ended(), None);
        assert_eq!(v.check(false), RestoreCheck::Client);
        // The light launch vouches again: nothing new to write.
        v.launched(Some((5, v.check(false), 1)));
        assert_eq!(v.heard(5, Some(0), 10), Heard::Complete(None));
        assert_eq!(v.net(), None, "vouched: no net");
        assert_eq!(v.ended(), None);
        assert_eq!(v.check(false), RestoreCheck::Client);
    }

    #[test]
    fn a_light_launch_that_ends_without_vouching_drops_the_record() {
        let mut v = Vouch::new(RestoreCheckMode::Auto, cmd(), Some(rec(2, cmd())));
        v.launched(Some((6, RestoreCheck::Client, 1)));
        let why = v.ended().expect("dropped");
        assert!(
            why.contains("checkpoint 6") && why.contains("0 of 1"),
            "{why}"
        );
        assert_eq!(v.check(false), RestoreCheck::Full);
        // A full launch that does not vouch changes nothing (there is nothing to drop).
        v.launched(Some((6, RestoreCheck::Full, 1)));
        assert_eq!(v.ended(), None);
        // A fresh start neither.
        v.launched(None);
        assert_eq!(v.ended(), None);
        assert_eq!(v.net(), None);
    }

    #[test]
    fn messages_for_another_checkpoint_or_rank_are_ignored() {
        let mut v = Vouch::new(RestoreCheckMode::Auto, cmd(), None);
        assert!(
            matches!(v.heard(1, None, 0), Heard::Ignored(_)),
            "no launch"
        );
        v.launched(None);
        assert!(
            matches!(v.heard(1, None, 0), Heard::Ignored(_)),
            "fresh start"
        );
        v.launched(Some((7, RestoreCheck::Full, 1)));
        assert!(matches!(v.heard(6, None, 0), Heard::Ignored(w) if w.contains("checkpoint 7")));
        assert!(matches!(v.heard(7, Some(1), 0), Heard::Ignored(w) if w.contains("rank 1")));
        assert_eq!(v.check(false), RestoreCheck::Full);
    }

    #[test]
    fn a_multi_rank_launch_needs_every_rank() {
        let mut v = Vouch::new(RestoreCheckMode::Auto, cmd(), None);
        v.launched(Some((3, RestoreCheck::Full, 3)));
        assert!(matches!(v.heard(3, None, 0), Heard::Ignored(w) if w.contains("names no rank")));
        assert_eq!(v.heard(3, Some(2), 0), Heard::Counted { got: 1, need: 3 });
        assert_eq!(v.heard(3, Some(2), 0), Heard::Repeat);
        assert_eq!(v.heard(3, Some(0), 0), Heard::Counted { got: 2, need: 3 });
        assert_eq!(v.check(false), RestoreCheck::Full, "not before every rank");
        assert!(matches!(v.heard(3, Some(1), 0), Heard::Complete(Some(r)) if r.ranks == 3));
        assert_eq!(v.check(false), RestoreCheck::Client);
        // A light launch where one rank does not vouch: dropped at its end.
        v.launched(Some((4, RestoreCheck::Client, 2)));
        assert_eq!(v.heard(4, Some(0), 0), Heard::Counted { got: 1, need: 2 });
        assert!(v.ended().expect("dropped").contains("1 of 2"));
        assert_eq!(v.check(false), RestoreCheck::Full);
    }

    #[test]
    fn the_net_fires_once_for_a_light_launch_that_saves_before_it_vouched() {
        let mut v = Vouch::new(RestoreCheckMode::Auto, cmd(), Some(rec(1, cmd())));
        v.launched(Some((8, RestoreCheck::Client, 1)));
        assert_eq!(v.net(), Some(8));
        assert_eq!(v.net(), None, "once per launch");
        assert!(v.forget());
        assert_eq!(v.check(false), RestoreCheck::Full);
        // Under --restore-check client too (the job's promise is checked the same way).
        let mut c = Vouch::new(RestoreCheckMode::Client, cmd(), None);
        c.launched(Some((2, RestoreCheck::Client, 1)));
        assert_eq!(c.net(), Some(2));
        // A full launch never needs it.
        let mut f = Vouch::new(RestoreCheckMode::Auto, cmd(), None);
        f.launched(Some((2, RestoreCheck::Full, 1)));
        assert_eq!(f.net(), None);
        assert_eq!(f.restoring(), Some((2, RestoreCheck::Full)));
    }

    #[test]
    fn another_commands_record_is_never_dropped_and_pending_names_an_unvouched_light_launch() {
        // --restore-check client, with a record written by another command: a light launch
        // that ends unvouched, or is netted, leaves it alone.
        let mut v = Vouch::new(
            RestoreCheckMode::Client,
            cmd(),
            Some(rec(3, vec!["./other".into()])),
        );
        v.launched(Some((5, RestoreCheck::Client, 1)));
        assert_eq!(v.pending(), Some(5));
        assert_eq!(v.net(), Some(5));
        assert!(!v.forget());
        assert_eq!(v.pending(), None, "netted: no longer pending");
        assert_eq!(v.ended(), None);
        // A vouched launch is not pending; a full one never is.
        let mut a = Vouch::new(RestoreCheckMode::Auto, cmd(), Some(rec(1, cmd())));
        a.launched(Some((2, RestoreCheck::Client, 2)));
        assert_eq!(a.pending(), Some(2));
        a.heard(2, Some(0), 0);
        assert_eq!(a.pending(), Some(2));
        a.heard(2, Some(1), 0);
        assert_eq!(a.pending(), None);
        a.launched(Some((3, RestoreCheck::Full, 1)));
        assert_eq!(a.pending(), None);
    }

    #[test]
    fn load_reads_a_record_and_refuses_what_ckpt_did_not_write() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()), Ok(None));
        let r = rec(3, cmd());
        std::fs::write(d.path().join(FILE), serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(load(d.path()), Ok(Some(r)));
        std::fs::write(d.path().join(FILE), b"{\"v\":1}").unwrap();
        assert!(load(d.path())
            .unwrap_err()
            .contains("not a file ckpt wrote"));
        std::fs::remove_file(d.path().join(FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join(FILE)).unwrap();
        assert!(load(d.path()).is_err(), "a symlink is refused");
        std::fs::remove_file(d.path().join(FILE)).unwrap();
        nix::unistd::mkfifo(&d.path().join(FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(load(d.path()).is_err(), "a FIFO is refused, without a hang");
    }
}
