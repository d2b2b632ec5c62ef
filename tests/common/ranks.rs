//! Helpers for multi-rank jobs of the `rank_trainer` test program (tests/multi_rank.rs,
//! tests/launchers.rs, tests/remote.rs): the uninterrupted result, the ranks' combined
//! result, and the checks every multi-rank test makes of its checkpoints and restores.

use std::path::Path;
use std::process::Command;

use super::{checkpoints, test_bin, text};

/// The global digest an uninterrupted `world`-rank run of `steps` steps ends with.
pub fn reference(world: u32, steps: u64) -> String {
    let out = Command::new(test_bin("rank_trainer"))
        .args(["--reference", "--world", &world.to_string()])
        .args(["--steps", &steps.to_string()])
        .output()
        .unwrap();
    text(&out.stdout).trim().to_string()
}

/// The global digest of the ranks' own digests in `out` (`digest-<rank>`).
pub fn combined(world: u32, out: &Path) -> String {
    let ds: Vec<String> = (0..world)
        .map(|r| {
            std::fs::read_to_string(out.join(format!("digest-{r}")))
                .unwrap_or_else(|_| panic!("rank {r} wrote no digest"))
        })
        .collect();
    let o = Command::new(test_bin("rank_trainer"))
        .args(["--combine", &ds.join(",")])
        .output()
        .unwrap();
    text(&o.stdout).trim().to_string()
}

/// Every published checkpoint verifies and holds exactly one shard per rank.
pub fn assert_complete_checkpoints(dir: &Path, world: u32) {
    let store = ckpt::store::Store::new(dir);
    for seq in checkpoints(dir) {
        let m = store
            .verify(seq)
            .unwrap_or_else(|e| panic!("checkpoint {seq} does not verify: {e}"));
        assert_eq!(m.world_size, Some(world), "checkpoint {seq}: world_size");
        for r in 0..world {
            let name = format!("rank-{r:05}/state.bin");
            assert!(
                m.files.iter().any(|f| f.name == name),
                "checkpoint {seq} lacks {name}"
            );
        }
    }
}

/// Every restore any rank made (`restores.log` in `out`) saw all shards of a checkpoint of
/// this world size; returns how many there were.
pub fn assert_restores_complete(out: &Path, world: u32) -> usize {
    let log = std::fs::read_to_string(out.join("restores.log")).unwrap_or_default();
    for l in log.lines() {
        assert!(
            l.ends_with(&format!("world {world} shards {world}")),
            "a partial or foreign checkpoint was restored: {l}"
        );
    }
    log.lines().count()
}
