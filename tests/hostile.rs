//! Hostile and broken directories, inputs and file systems (issue 16): a corpus of hostile
//! checkpoint directories, generated here, against which every command that reads a
//! directory runs with a deadline: no hang, no panic, a clear error. Plus one test per
//! escape: `gc` through a symlinked `.ckpt`, sequence number `u64::MAX`, symlinks and
//! non-UTF-8 names in `ckpt save`, hard links to another user's files, a copied directory's
//! `status.json`, a removed lock file, terminal escapes, `service --user`, event log growth.

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ckpt::store::{Algo, Manifest, Stage, Store};
use common::*;

/// Runs `cmd` with a deadline; `None` when it had to be killed (a hang).
fn run_deadline(cmd: &mut Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out_pipe = child.stdout.take().unwrap();
    let err_pipe = child.stderr.take().unwrap();
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out_t = read(Box::new(out_pipe));
    let err_t = read(Box::new(err_pipe));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

/// Publishes a checkpoint with the given files through the library.
fn save(dir: &Path, files: &[(&str, &[u8])], step: u64) -> u64 {
    let store = Store::new(dir);
    store.create().unwrap();
    let mut st = Stage::new(&store, Algo::Crc32c).unwrap();
    for (n, d) in files {
        st.write_file(n, d).unwrap();
    }
    st.commit(Some(step), "test", Default::default())
        .unwrap()
        .seq
}

/// Writes a checkpoint directory by hand: `files` and a manifest claiming `seq`.
fn hand_made(dir: &Path, seq: u64, created_ms: u64, writer: &str, files: &[(&str, &[u8])]) {
    let p = dir.join(format!("ckpt-{seq:012}"));
    std::fs::create_dir_all(&p).unwrap();
    let mut entries = Vec::new();
    for (n, d) in files {
        std::fs::write(p.join(n), d).unwrap();
        entries.push(ckpt::store::FileEntry {
            name: n.to_string(),
            size: d.len() as u64,
            sum: Algo::Crc32c.checksum(d),
        });
    }
    let mut m = Manifest::new(seq, Some(u64::MAX), writer, Algo::Crc32c, entries);
    m.created_ms = created_ms;
    m.meta.insert(
        "note".into(),
        serde_json::json!("\u{1b}]2;pwned\u{7}\u{1b}[31mred"),
    );
    std::fs::write(p.join("MANIFEST.ckpt"), m.encode()).unwrap();
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {p:?}"
    );
}

fn symlink(target: impl AsRef<Path>, link: &Path) {
    if std::fs::symlink_metadata(link).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(link).unwrap();
    } else {
        let _ = std::fs::remove_file(link);
    }
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// A healthy directory: checkpoints 1 and 2, a tag, an event log, a status file.
fn base(dir: &Path) {
    save(dir, &[("a", b"one"), ("b", b"bee")], 1);
    save(dir, &[("a", b"two"), ("b", b"bee")], 2);
    Store::new(dir)
        .update_tags(|t| {
            t.insert("first".into(), 1);
            Ok(())
        })
        .unwrap();
    std::fs::write(
        dir.join(".ckpt/events.jsonl"),
        "{\"t_ms\":1000,\"event\":\"start\"}\n{\"t_ms\":2000,\"event\":\"launch\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join(".ckpt/status.json"),
        "{\"control_socket\":\"/nonexistent/ckpt-test.sock\"}\n",
    )
    .unwrap();
}

/// The corpus: a name and how to spoil a healthy directory (`elsewhere` is a scratch
/// directory outside it).
type Spoil = fn(&Path, &Path);

fn corpus() -> Vec<(&'static str, Spoil)> {
    vec![
        ("healthy", |_, _| {}),
        ("fifo-manifest", |d, _| {
            mkfifo(&d.join("ckpt-000000000002/MANIFEST.ckpt"))
        }),
        ("fifo-member", |d, _| mkfifo(&d.join("ckpt-000000000002/a"))),
        ("fifo-tags", |d, _| mkfifo(&d.join(".ckpt/tags.json"))),
        ("fifo-tags-lock", |d, _| mkfifo(&d.join(".ckpt/tags.lock"))),
        ("fifo-events", |d, _| mkfifo(&d.join(".ckpt/events.jsonl"))),
        ("fifo-events-old", |d, _| {
            mkfifo(&d.join(".ckpt/events.jsonl.1"))
        }),
        ("fifo-status", |d, _| mkfifo(&d.join(".ckpt/status.json"))),
        ("fifo-finished", |d, _| mkfifo(&d.join(".ckpt/finished"))),
        ("fifo-lock", |d, _| mkfifo(&d.join(".ckpt/lock"))),
        ("symlinked-private", |d, e| {
            let target = e.join("private");
            std::fs::create_dir_all(target.join("staging/x.1")).unwrap();
            std::fs::create_dir_all(target.join("trash/y")).unwrap();
            std::fs::write(target.join("tags.json"), "{\"version\":1,\"tags\":{}}").unwrap();
            symlink(&target, &d.join(".ckpt"));
        }),
        ("private-is-a-file", |d, _| {
            std::fs::remove_dir_all(d.join(".ckpt")).unwrap();
            std::fs::write(d.join(".ckpt"), "x").unwrap();
        }),
        ("symlinked-checkpoint", |d, e| {
            let target = e.join("ck");
            std::fs::rename(d.join("ckpt-000000000002"), &target).unwrap();
            symlink(&target, &d.join("ckpt-000000000002"));
        }),
        ("symlinked-member", |d, _| {
            symlink("/etc/passwd", &d.join("ckpt-000000000002/a"))
        }),
        ("symlinked-manifest", |d, e| {
            let m = e.join("m");
            std::fs::copy(d.join("ckpt-000000000002/MANIFEST.ckpt"), &m).unwrap();
            symlink(&m, &d.join("ckpt-000000000002/MANIFEST.ckpt"));
        }),
        ("checkpoint-is-a-file", |d, _| {
            std::fs::write(d.join("ckpt-000000000003"), "x").unwrap()
        }),
        ("garbage-manifest", |d, _| {
            std::fs::write(
                d.join("ckpt-000000000002/MANIFEST.ckpt"),
                b"\xff\xfe{\"format\":\x1b[2J",
            )
            .unwrap()
        }),
        ("huge-numbers", |d, _| {
            hand_made(d, u64::MAX, u64::MAX, "w\u{1b}[2Jriter", &[("a", b"max")])
        }),
        ("far-future", |d, _| {
            hand_made(d, 3, 253_402_300_800_000, "future", &[("a", b"x")])
        }),
        ("quarantined-max", |d, _| {
            std::fs::create_dir_all(d.join("quarantine/ckpt-18446744073709551615.bad.x")).unwrap()
        }),
        ("non-utf8-names", |d, _| {
            let raw = |b: &[u8]| d.join(OsStr::from_bytes(b));
            std::fs::create_dir_all(raw(b"ckpt-\xff")).unwrap();
            std::fs::create_dir_all(d.join("quarantine")).unwrap();
            std::fs::create_dir_all(d.join(OsStr::from_bytes(b"quarantine/ckpt-1.\xff"))).unwrap();
            std::fs::create_dir_all(d.join(OsStr::from_bytes(b".ckpt/staging/\xff.1"))).unwrap();
            std::fs::write(
                d.join("ckpt-000000000002")
                    .join(OsStr::from_bytes(b"stray-\xff")),
                "not in the manifest",
            )
            .unwrap();
        }),
        ("hostile-events", |d, _| {
            std::fs::write(
                d.join(".ckpt/events.jsonl"),
                [
                    &b"{\"t_ms\":18446744073709551615,\"event\":\"exit\",\"exit\":1}\n"[..],
                    b"{\"t_ms\":0,\"event\":\"committed\",\"duration_ms\":18446744073709551615}\n",
                    b"{\"t_ms\":1,\"event\":\"committed\",\"duration_ms\":18446744073709551615}\n",
                    b"{\"t_ms\":2,\"event\":\"restart\",\"delay_ms\":18446744073709551615}\n",
                    b"{\"t_ms\":3,\"event\":\"\x1b]2;title\x07\",\"msg\":\"\x1b[2J\"}\n",
                    b"\xff\xfe not json\n",
                    b"{\"t_ms\":-1,\"event\":7}\n",
                ]
                .concat(),
            )
            .unwrap()
        }),
        ("garbage-tags", |d, _| {
            std::fs::write(
                d.join(".ckpt/tags.json"),
                "{\"version\":1,\"tags\":{\"\\u001b[2J\":18446744073709551615}}",
            )
            .unwrap()
        }),
        ("huge-tags", |d, _| {
            let f = std::fs::File::create(d.join(".ckpt/tags.json")).unwrap();
            f.set_len(64 << 20).unwrap();
        }),
        ("unreadable-staging", |d, _| {
            std::fs::write(d.join(".ckpt/staging"), "not a dir").unwrap_or_else(|_| {
                std::fs::remove_dir_all(d.join(".ckpt/staging")).unwrap();
                std::fs::write(d.join(".ckpt/staging"), "not a dir").unwrap();
            })
        }),
    ]
}

/// Every command that reads a directory, as arguments after `ckpt`; `{D}` is the directory,
/// `{E}` a scratch directory, `{N}` a fresh directory. Commands that change the directory
/// (`gc`, `tag`, `rollback`, `import`) run last on each copy.
fn commands() -> Vec<Vec<&'static str>> {
    vec![
        vec!["list", "--dir", "{D}"],
        vec!["list", "--json", "--dir", "{D}"],
        vec!["verify", "--dir", "{D}"],
        vec!["verify", "--json", "--dir", "{D}", "latest"],
        vec!["show", "--dir", "{D}", "latest"],
        vec!["show", "--json", "--verify", "--dir", "{D}", "latest"],
        vec!["show", "--dir", "{D}", "first"],
        vec!["diff", "--dir", "{D}", "1", "latest"],
        vec!["diff", "--json", "--dir", "{D}", "1", "latest"],
        vec!["log", "--dir", "{D}"],
        vec!["log", "--json", "--dir", "{D}"],
        vec!["stats", "--dir", "{D}"],
        vec!["stats", "--json", "--dir", "{D}"],
        vec!["status", "--dir", "{D}"],
        vec!["stop", "--no-wait", "--dir", "{D}"],
        vec!["checkpoint", "--dir", "{D}"],
        vec![
            "export",
            "--json",
            "--dir",
            "{D}",
            "latest",
            "--to",
            "{E}/export",
        ],
        vec!["import", "--dir", "{N}", "{D}/ckpt-000000000002"],
        vec![
            "import",
            "--link",
            "--json",
            "--dir",
            "{N}",
            "{D}/ckpt-000000000002",
        ],
        vec!["gc", "--dry-run", "--keep", "1", "--dir", "{D}"],
        vec![
            "gc",
            "--json",
            "--older-than",
            "0s",
            "--keep",
            "1",
            "--dir",
            "{D}",
        ],
        vec!["tag", "--dir", "{D}", "latest", "t2"],
        vec!["rollback", "--json", "--dir", "{D}", "1"],
        vec!["save", "--json", "--dir", "{D}", "{E}/payload"],
        vec!["run", "--quiet", "--dir", "{D}", "--", "true"],
    ]
}

fn expand(arg: &str, d: &Path, e: &Path, n: &Path) -> OsString {
    let mut out = Vec::new();
    let mut rest = arg.as_bytes();
    while !rest.is_empty() {
        let (tok, p): (&[u8], Option<&Path>) = if rest.starts_with(b"{D}") {
            (b"{D}", Some(d))
        } else if rest.starts_with(b"{E}") {
            (b"{E}", Some(e))
        } else if rest.starts_with(b"{N}") {
            (b"{N}", Some(n))
        } else {
            (&rest[..1], None)
        };
        match p {
            Some(p) => out.extend_from_slice(p.as_os_str().as_bytes()),
            None => out.extend_from_slice(tok),
        }
        rest = &rest[tok.len()..];
    }
    OsString::from_vec(out)
}

/// Runs every command against every directory of the corpus; `dir_name` names the
/// directory inside the temp dir (non-UTF-8 in one test).
fn run_corpus(dir_name: &OsStr, only: impl Fn(usize, &str) -> bool) {
    let root = tempdir();
    let mut failures = Vec::new();
    let mut runs = 0;
    for (k, (name, spoil)) in corpus().into_iter().enumerate() {
        if !only(k, name) {
            continue;
        }
        let case = root.path().join(name);
        let d = case.join(dir_name);
        // Named after `dir_name` too: a non-UTF-8 directory gets non-UTF-8 `--to` and import
        // targets as well.
        let named = |suffix: &str| {
            let mut n = dir_name.to_os_string();
            n.push(suffix);
            case.join(n)
        };
        let e = named("-elsewhere");
        std::fs::create_dir_all(&e).unwrap();
        std::fs::write(e.join("payload"), "payload").unwrap();
        base(&d);
        spoil(&d, &e);
        for (i, args) in commands().into_iter().enumerate() {
            let n = named(&format!("-new-{i}"));
            let _ = std::fs::remove_dir_all(e.join("export"));
            let argv: Vec<OsString> = args.iter().map(|a| expand(a, &d, &e, &n)).collect();
            let shown = format!("[{name}] ckpt {}", args.join(" "));
            runs += 1;
            let Some(out) = run_deadline(ckpt().args(&argv), Duration::from_secs(10)) else {
                failures.push(format!("{shown}: HANG (killed after 10 s)"));
                continue;
            };
            let err = text(&out.stderr);
            let code = out.status.code();
            if code == Some(101) || err.contains("panicked") || code.is_none() {
                failures.push(format!("{shown}: PANIC/CRASH ({:?}): {err}", out.status));
                continue;
            }
            let json_lines = !out.stdout.is_empty()
                && text(&out.stdout)
                    .lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok());
            let said = err.contains("ckpt: error: ")
                || text(&out.stdout).contains("INVALID")
                || (args.contains(&"--json") && json_lines);
            if code != Some(0) && !said {
                failures.push(format!(
                    "{shown}: exit {code:?} without a clear error: {err}"
                ));
            }
            let all = [&out.stdout[..], &out.stderr[..]].concat();
            if all.contains(&0x1b) || all.contains(&0x07) {
                failures.push(format!(
                    "{shown}: raw terminal escape in the output: {:?}",
                    text(&all)
                ));
            }
            if args.contains(&"--json") && code == Some(0) && !json_lines {
                failures.push(format!(
                    "{shown}: --json printed no JSON: {}",
                    text(&out.stdout)
                ));
            }
        }
        // Nothing outside the directory was touched.
        assert!(
            e.join("payload").exists(),
            "[{name}] scratch directory damaged"
        );
    }
    eprintln!("{runs} command runs");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_command_survives_fifos() {
    run_corpus(OsStr::new("d"), |_, n| n.starts_with("fifo-"));
}

#[test]
fn every_command_survives_planted_links_and_odd_entries() {
    run_corpus(OsStr::new("d"), |k, n| {
        !n.starts_with("fifo-") && k % 2 == 0
    });
}

#[test]
fn every_command_survives_garbage_and_extreme_values() {
    run_corpus(OsStr::new("d"), |k, n| {
        !n.starts_with("fifo-") && k % 2 == 1
    });
}

#[test]
fn every_command_survives_a_non_utf8_dir() {
    run_corpus(OsStr::from_bytes(b"d-\xff\xfe"), |_, n| {
        [
            "healthy",
            "huge-numbers",
            "non-utf8-names",
            "symlinked-checkpoint",
        ]
        .contains(&n)
    });
}

#[test]
fn read_only_commands_refuse_fifos_with_a_clear_error() {
    let root = tempdir();
    let d = root.path().join("d");
    base(&d);
    mkfifo(&d.join(".ckpt/tags.json"));
    let out = output_deadline(
        ckpt().args(["list", "--dir"]).arg(&d),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("tags.json") && err.contains("FIFO"), "{err}");
    mkfifo(&d.join(".ckpt/events.jsonl"));
    let out = output_deadline(
        ckpt().args(["log", "--dir"]).arg(&d),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("events.jsonl") && err.contains("FIFO"),
        "{err}"
    );
    // A FIFO manifest makes that checkpoint invalid, named as such.
    std::fs::remove_file(d.join(".ckpt/tags.json")).unwrap();
    mkfifo(&d.join("ckpt-000000000002/MANIFEST.ckpt"));
    let out = output_deadline(
        ckpt().args(["verify", "--dir"]).arg(&d),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(65));
    let o = text(&out.stdout);
    assert!(o.contains("INVALID") && o.contains("MANIFEST.ckpt"), "{o}");
}

#[test]
fn retention_with_a_fifo_tag_file_fails_fast_and_removes_nothing() {
    // What a running supervisor's prune does after each checkpoint.
    let root = tempdir();
    let d = root.path().join("d");
    base(&d);
    save(&d, &[("a", b"three")], 3);
    mkfifo(&d.join(".ckpt/tags.json"));
    let t = Instant::now();
    let e = Store::new(&d).prune(1, None, &[3]).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        e.to_string().contains("tags.json") && e.to_string().contains("FIFO"),
        "{e}"
    );
    assert_eq!(checkpoints(&d), vec![1, 2, 3]);
}

#[test]
fn gc_refuses_a_symlinked_private_dir_and_deletes_nothing_outside() {
    let root = tempdir();
    let d = root.path().join("d");
    base(&d);
    let victim = root.path().join("victim");
    for sub in ["staging/x.999999999", "trash/ckpt-1.x", "staging/y"] {
        std::fs::create_dir_all(victim.join(sub)).unwrap();
        std::fs::write(victim.join(sub).join("precious"), "keep me").unwrap();
    }
    std::fs::remove_dir_all(d.join(".ckpt")).unwrap();
    std::os::unix::fs::symlink(&victim, d.join(".ckpt")).unwrap();
    for args in [
        &["gc", "--older-than", "0s"][..],
        &["gc", "--older-than", "0s", "--keep", "1"],
        &["gc", "--json", "--older-than", "0s", "--rolled-back"],
    ] {
        let out = output_deadline(
            ckpt().args(args).arg("--dir").arg(&d),
            Duration::from_secs(10),
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(".ckpt") && err.contains("symlink"), "{err}");
    }
    for sub in ["staging/x.999999999", "trash/ckpt-1.x", "staging/y"] {
        assert!(
            victim.join(sub).join("precious").exists(),
            "{sub} was deleted"
        );
    }
    assert_eq!(checkpoints(&d), vec![1, 2]);
}

#[test]
fn sequence_number_max_never_wraps() {
    let root = tempdir();
    // A valid checkpoint numbered u64::MAX: the next save is refused, clearly.
    let d = root.path().join("d");
    save(&d, &[("a", b"x")], 1);
    hand_made(&d, u64::MAX, 1, "w", &[("a", b"max")]);
    let payload = root.path().join("payload");
    std::fs::write(&payload, "p").unwrap();
    let out = output_deadline(
        ckpt().args(["save", "--dir"]).arg(&d).arg(&payload),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("18446744073709551615") && err.contains("largest"),
        "{err}"
    );
    assert!(!d.join("ckpt-000000000000").exists(), "wrapped to ckpt-0");
    assert_eq!(checkpoints(&d), vec![1, u64::MAX]);
    // Readers are not poisoned.
    let out = output_deadline(
        ckpt().args(["verify", "--dir"]).arg(&d),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A quarantined (or rolled-back) one numbered u64::MAX does not block saves.
    let q = root.path().join("q");
    save(&q, &[("a", b"x")], 1);
    std::fs::create_dir_all(q.join("quarantine/ckpt-18446744073709551615.bad.tok")).unwrap();
    std::fs::create_dir_all(q.join("rolled-back/ckpt-18446744073709551615.tok")).unwrap();
    let out = output_deadline(
        ckpt()
            .args(["save", "--json", "--dir"])
            .arg(&q)
            .arg(&payload),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(checkpoints(&q), vec![1, 2]);
    // The library's save path says the same.
    let store = Store::new(&d);
    let mut st = Stage::new(&store, Algo::Crc32c).unwrap();
    st.write_file("a", b"y").unwrap();
    let e = st.commit(None, "t", Default::default()).unwrap_err();
    assert!(e.to_string().contains("largest possible number"), "{e}");
}

#[test]
fn save_follows_no_symlink_inside_a_saved_directory() {
    let root = tempdir();
    let d = root.path().join("d");
    let src = root.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("ok"), "fine").unwrap();
    let secret = root.path().join("secret");
    std::fs::write(&secret, "root's secret").unwrap();
    std::os::unix::fs::symlink(&secret, src.join("shadow")).unwrap();
    let out = output_deadline(
        ckpt().args(["save", "--dir"]).arg(&d).arg(&src),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("shadow") && err.contains("symlink"), "{err}");
    assert!(checkpoints(&d).is_empty());
    // A link to a directory is not recursed into.
    std::fs::remove_file(src.join("shadow")).unwrap();
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("x"), "x").unwrap();
    std::os::unix::fs::symlink(&outside, src.join("sub/link")).unwrap();
    let out = output_deadline(
        ckpt().args(["save", "--dir"]).arg(&d).arg(&src),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("link") && err.contains("symlink"), "{err}");
    assert!(checkpoints(&d).is_empty());
    // A FIFO inside is refused, not waited on.
    std::fs::remove_file(src.join("sub/link")).unwrap();
    mkfifo(&src.join("sub/fifo"));
    let out = output_deadline(
        ckpt().args(["save", "--dir"]).arg(&d).arg(&src),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    std::fs::remove_file(src.join("sub/fifo")).unwrap();
    // Non-UTF-8 names: refused naming the file (escaped), never stored as U+FFFD.
    std::fs::write(src.join(OsStr::from_bytes(b"caf\xe9")), "x").unwrap();
    let out = output_deadline(
        ckpt().args(["save", "--dir"]).arg(&d).arg(&src),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("caf\\xe9") && err.contains("UTF-8"), "{err}");
    assert!(checkpoints(&d).is_empty());
    // The same through the library: a job writing such a name into its stage.
    let store = Store::new(&d);
    store.create().unwrap();
    let st = Stage::new(&store, Algo::Crc32c).unwrap();
    std::fs::write(st.path().join(OsStr::from_bytes(b"n\xff")), "x").unwrap();
    let e = st.commit(None, "t", Default::default()).unwrap_err();
    assert!(e.to_string().contains("n\\xff"), "{e}");
    // A symlink the user names on the command line is what they chose: followed.
    std::fs::remove_file(src.join(OsStr::from_bytes(b"caf\xe9"))).unwrap();
    let named = root.path().join("named");
    std::os::unix::fs::symlink(src.join("ok"), &named).unwrap();
    let out = output_deadline(
        ckpt().args(["save", "--dir"]).arg(&d).arg(&src).arg(&named),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn import_link_never_hard_links_another_users_files() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to chown the source to another user");
        return;
    }
    let root = tempdir();
    let src = root.path().join("src");
    save(&src, &[("a", b"theirs"), ("b", b"more")], 1);
    // The source belongs to another user (nobody).
    let chown = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), 65534, 65534) }, 0);
    };
    for ent in std::fs::read_dir(src.join("ckpt-000000000001")).unwrap() {
        chown(&ent.unwrap().path());
    }
    let d = root.path().join("d");
    let out = output_deadline(
        ckpt()
            .args(["import", "--link", "--json", "--dir"])
            .arg(&d)
            .arg(src.join("ckpt-000000000001")),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["linked"], 0, "{v}");
    let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_ne!(
        ino(src.join("ckpt-000000000001/a")),
        ino(d.join("ckpt-000000000001/a"))
    );
    // `ckpt run --from` (a branch) likewise.
    let b = root.path().join("b");
    let out = output_deadline(
        ckpt()
            .args(["run", "--quiet", "--dir"])
            .arg(&b)
            .arg("--from")
            .arg(&src)
            .args(["--", "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_ne!(
        ino(src.join("ckpt-000000000001/a")),
        ino(b.join("ckpt-000000000001/a"))
    );
    // Our own files are still shared.
    let own = root.path().join("own");
    save(&own, &[("a", b"mine")], 1);
    let d2 = root.path().join("d2");
    let out = output_deadline(
        ckpt()
            .args(["import", "--link", "--json", "--dir"])
            .arg(&d2)
            .arg(own.join("ckpt-000000000001")),
        Duration::from_secs(10),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["linked"], 1, "{v}");
}

/// A supervisor on `dir` running `sleep 60` (no client), once its control socket answers.
fn supervise(dir: &Path, stderr: Stdio) -> Running {
    let sup = ckpt()
        .args(["run", "--every", "off", "--dir"])
        .arg(dir)
        .args(["--", "sleep", "60"])
        .stderr(stderr)
        .spawn_guarded();
    wait_until(Duration::from_secs(10), "the supervisor to answer", || {
        ckpt()
            .args(["status", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    sup
}

fn stop(dir: &Path, sup: &mut Running) {
    let out = output_deadline(
        ckpt().args(["stop", "--no-checkpoint", "--dir"]).arg(dir),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_deadline(sup, Duration::from_secs(10));
    assert_no_survivors(dir);
}

#[test]
fn a_copied_directory_does_not_reach_the_original_supervisor() {
    let root = tempdir();
    let d = root.path().join("d");
    let mut sup = supervise(&d, Stdio::null());
    let copy = root.path().join("copy");
    let st = Command::new("cp")
        .args(["-a", "--"])
        .arg(&d)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(copy.join(".ckpt/status.json").exists());
    for args in [
        &["stop", "--no-wait"][..],
        &["stop", "--no-checkpoint", "--no-wait"],
        &["checkpoint"],
        &["status"],
    ] {
        let out = output_deadline(
            ckpt().args(args).arg("--dir").arg(&copy),
            Duration::from_secs(10),
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{args:?}: {err}");
        assert!(err.contains("another directory"), "{err}");
    }
    assert!(
        sup.try_wait().unwrap().is_none(),
        "the original was stopped"
    );
    stop(&d, &mut sup);
}

#[test]
fn a_removed_lock_file_does_not_let_a_second_supervisor_in() {
    let root = tempdir();
    let d = root.path().join("d");
    let mut sup = supervise(&d, Stdio::null());
    std::fs::remove_file(d.join(".ckpt/lock")).unwrap();
    let out = output_deadline(
        ckpt().args(["run", "--dir"]).arg(&d).args(["--", "true"]),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(err.contains("in use"), "{err}");
    // A replaced one neither.
    std::fs::write(d.join(".ckpt/lock"), "").unwrap();
    let out = output_deadline(
        ckpt().args(["rollback", "--dir"]).arg(&d).arg("latest"),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(73), "{}", text(&out.stderr));
    assert!(sup.try_wait().unwrap().is_none());
    stop(&d, &mut sup);
}

#[test]
fn a_message_flood_is_rate_limited_and_escaped() {
    let root = tempdir();
    let d = root.path().join("d");
    let err_file = root.path().join("stderr");
    let mut sup = supervise(&d, Stdio::from(std::fs::File::create(&err_file).unwrap()));
    let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let msg = serde_json::json!({
        "type": "save_failed", "v": 1, "pid": 1,
        "error": format!("\u{1b}]2;pwned\u{7}\u{1b}[2J{}", "x".repeat(1000)),
    })
    .to_string();
    const N: u64 = 20_000;
    for _ in 0..N {
        sock.send_to(msg.as_bytes(), d.join(".ckpt/sock")).unwrap();
    }
    let last = 1u64 << (63 - N.leading_zeros()); // the largest power of two <= N
    wait_until(
        Duration::from_secs(10),
        "the last logged save_failed",
        || events(&d, "save_failed").iter().any(|e| e["count"] == last),
    );
    let logged = events(&d, "save_failed").len();
    assert!(
        logged <= 30,
        "{logged} save_failed events logged for {N} messages"
    );
    let size = std::fs::metadata(d.join(".ckpt/events.jsonl"))
        .unwrap()
        .len();
    assert!(size < 128 << 10, "events.jsonl grew to {size} bytes");
    stop(&d, &mut sup);
    let err = std::fs::read(&err_file).unwrap();
    let lines = text(&err).matches("could not save").count();
    assert!(lines <= 30, "{lines} warnings on stderr for {N} messages");
    assert!(
        !err.contains(&0x1b) && !err.contains(&0x07),
        "raw escapes on stderr"
    );
    assert!(text(&err).contains("\\x1b]2;pwned\\x07"), "{}", text(&err));
}

#[test]
fn service_user_refuses_control_characters() {
    for user in [
        "root\nExecStartPre=/bin/sh -c evil",
        "a b",
        "x\r",
        "",
        "r\u{1b}t",
    ] {
        let out = output_deadline(
            ckpt().args([
                "service", "--name", "t", "--dir", "/tmp/x", "--user", user, "--", "true",
            ]),
            Duration::from_secs(10),
        );
        assert_eq!(
            out.status.code(),
            Some(64),
            "{user:?}: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stdout).contains("ExecStartPre"), "{user:?}");
    }
    let out = output_deadline(
        ckpt().args([
            "service", "--name", "t", "--dir", "/tmp/x", "--user", "nobody", "--", "true",
        ]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("User=nobody\n"));
}
