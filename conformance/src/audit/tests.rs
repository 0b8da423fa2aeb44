//! Unit tests of the host audit: attribution by cell, marker, secret and ancestry.

use super::*;

fn needles(cell: &str, marker: &str) -> Needles {
    Needles {
        cell: cell.into(),
        marker: marker.into(),
        ..Needles::default()
    }
}

#[test]
fn names_mentioning_a_cell_are_found_everywhere_else_ignored() {
    let tok = crate::ids::random_token(10);
    let cell = format!("cc-{tok}-audit-01");
    let dir = tempfile::tempdir().unwrap();
    let before = Snapshot::take(&[dir.path().to_path_buf()]);
    let mine = dir.path().join(format!("state-{cell}"));
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("inner"), b"x").unwrap();
    let other = dir.path().join("someone-else");
    std::fs::write(&other, b"x").unwrap();
    let mut child = crate::residue::spawn_marked(
        std::process::Command::new("sleep").arg("30"),
        &format!("ccm-{tok}"),
    )
    .unwrap();
    let after = Snapshot::take(&[dir.path().to_path_buf()]);
    let n = needles(&cell, &format!("ccm-{tok}"));
    let found = scoped(std::slice::from_ref(&n), &before, &after);
    let text: Vec<String> = found.iter().map(|(_, l)| l.to_string()).collect();
    assert!(
        found.contains(&(cell.clone(), Leftover::File(mine.clone()))),
        "{text:?}"
    );
    // The tree is reported once, by its top.
    assert!(!text.iter().any(|t| t.contains("inner")), "{text:?}");
    assert!(!text.iter().any(|t| t.contains("someone-else")), "{text:?}");
    assert!(
        text.iter()
            .any(|t| t.contains(&format!("pid {}", child.id()))),
        "{text:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&mine).unwrap();
    let clean = scoped(&[n], &before, &Snapshot::take(&[dir.path().to_path_buf()]));
    assert!(clean.is_empty(), "{clean:?}");
}

#[test]
fn secrets_are_found_in_new_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("s3cr3t-{}", crate::ids::random_token(20));
    let old = dir.path().join("old");
    std::fs::write(&old, b"nothing").unwrap();
    let before = Snapshot::take(&[dir.path().to_path_buf()]);
    let leak = dir.path().join("x");
    std::fs::write(&leak, format!("k={secret}\n")).unwrap();
    let after = Snapshot::take(&[dir.path().to_path_buf()]);
    assert_eq!(
        files_with_secrets(&before, &after, std::slice::from_ref(&secret)),
        vec![leak.canonicalize().unwrap()]
    );
}

#[test]
fn window_blames_an_unmarked_child_and_a_zombie() {
    let w = Window {
        st: Mutex::new(WindowState::default()),
    };
    let i = w.open("b1", "b1::t");
    let mut helper = std::process::Command::new("sleep")
        .arg("30")
        .env_clear()
        .spawn()
        .unwrap();
    let mut zombie = std::process::Command::new("true").spawn().unwrap();
    // `true` exits at once; unreaped, it is a zombie child of ours.
    while std::fs::read_to_string(format!("/proc/{}/stat", zombie.id()))
        .is_ok_and(|s| !s.contains(") Z "))
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let rep = w.close(i, Vec::new(), None).unwrap();
    helper.kill().unwrap();
    helper.wait().unwrap();
    zombie.wait().unwrap();
    let v = rep.leftovers.get("b1").cloned().unwrap_or_default();
    assert!(
        v.iter()
            .any(|l| l.contains(&format!("pid {}", helper.id()))),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|l| l.contains(&format!("zombie child pid {}", zombie.id()))),
        "{v:?}"
    );
}

#[test]
fn ancestry_follows_the_ppid_chain() {
    let mut s = Snapshot::default();
    let me = std::process::id();
    for (pid, ppid) in [(100_001, me), (100_002, 100_001), (100_003, 1)] {
        s.procs.insert(
            (pid, 1),
            Proc {
                pid,
                start: 1,
                ppid,
                state: 'S',
                cgroup: String::new(),
                cmdline: vec![],
                environ: vec![],
            },
        );
    }
    let get = |pid| s.procs[&(pid, 1)].clone();
    assert!(s.descends_from_me(&get(100_002)));
    assert!(!s.descends_from_me(&get(100_003)));
}

#[test]
fn stat_fields_agree_with_procfs() {
    let me = std::process::id();
    let b = std::fs::read(format!("/proc/{me}/stat")).unwrap();
    let f = stat_fields(&b).unwrap();
    let st = procfs::process::Process::myself().unwrap().stat().unwrap();
    assert_eq!(
        (f.state, f.ppid, f.starttime),
        (st.state, st.ppid as u32, st.starttime)
    );
    let odd = b"42 (a) b) (c) S 7 42 42 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 123456 0 0";
    let f = stat_fields(odd).unwrap();
    assert_eq!((f.state, f.ppid, f.starttime), ('S', 7, 123456));
    assert!(stat_fields(b"garbage").is_none());
}

#[test]
fn the_index_finds_every_needle_once_per_owner_and_never_across_haystacks() {
    let ix = NeedleIndex::new([
        (0, &b"cc-tok-"[..]),
        (1, b"cc-tok-a1"),
        (2, b"cc-tok-"),
        (3, b""),
    ]);
    // One needle inside another: both owners; a needle shared by two owners: both.
    assert_eq!(ix.owners(b"x cc-tok-a1 y"), BTreeSet::from([0, 1, 2]));
    assert_eq!(ix.owners(b"cc-tok-b2"), BTreeSet::from([0, 2]));
    // The empty needle matches nothing; no match spans two haystacks.
    assert!(ix.owners(b"anything").is_empty());
    let mut out = BTreeSet::new();
    ix.owners_in(&[b"cc-to", b"k-a1"], &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert!(NeedleIndex::new([]).owners(b"cc-tok-").is_empty());
}

/// The per-cell search the index replaced, written out: what `scoped` must still find.
fn scoped_one_by_one(cells: &[Needles], after: &Snapshot) -> Vec<String> {
    let me = std::process::id();
    let mut out = Vec::new();
    for c in cells {
        for p in after.procs.values() {
            if p.state == 'Z' && p.ppid == me && c.host_pids.contains(&(p.pid, p.start)) {
                out.push(format!("{} {}", c.cell, Leftover::Zombie { pid: p.pid }));
            } else if let Some(why) = c.process_reason(p).filter(|_| p.runnable()) {
                let l = Leftover::Process {
                    proc_: p.describe(),
                    why,
                };
                out.push(format!("{} {l}", c.cell));
            }
        }
        let named = after
            .cgroups
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .chain(after.mounts.iter().cloned())
            .chain(after.netns.iter().cloned())
            .chain(after.loops.iter().cloned());
        for n in named {
            if c.mentioned_in(&n).is_some() {
                out.push(format!("{} {n}", c.cell));
            }
        }
        for p in after.files.keys() {
            if c.mentioned_in(&p.to_string_lossy()).is_some() {
                out.push(format!("{} {}", c.cell, p.display()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn scoped_with_many_cells_finds_what_each_cell_alone_finds() {
    let me = std::process::id();
    let tok = crate::ids::random_token(10);
    let cells: Vec<Needles> = (0..12)
        .map(|i| Needles {
            cell: format!("cc-{tok}-cell-{i:02}"),
            marker: format!("ccm-{tok}-{i:02}"),
            secrets: vec![format!("secret-{tok}-{i}")],
            process_markers: vec![format!("rt-{tok}-{i:02}")],
            host_pids: vec![(900_000 + i, 7)],
        })
        .chain(std::iter::once(Needles {
            // What a trial's released cells are looked for by: the prefix of every id.
            cell: format!("cc-{tok}-"),
            process_markers: vec![format!("ccm-{tok}-")],
            ..Needles::default()
        }))
        .collect();
    let mut after = Snapshot::default();
    let mut add = |pid: u32, state: char, ppid: u32, cmdline: String, environ: String| {
        after.procs.insert(
            (pid, 7),
            Proc {
                pid,
                start: 7,
                ppid,
                state,
                cgroup: String::new(),
                cmdline: cmdline.into_bytes(),
                environ: environ.into_bytes(),
            },
        );
    };
    add(
        800_001,
        'S',
        1,
        format!("runc\0run\0rt-{tok}-03\0"),
        String::new(),
    );
    add(
        800_002,
        'S',
        1,
        "sh\0".into(),
        format!("{MARKER_VAR}=ccm-{tok}-04\0"),
    );
    add(
        800_003,
        'S',
        1,
        "probe\0".into(),
        format!("X=secret-{tok}-5\0"),
    );
    add(
        800_004,
        'S',
        1,
        format!("x\0cc-{tok}-cell-06/y\0"),
        String::new(),
    );
    add(900_007, 'Z', me, String::new(), String::new());
    add(850_008, 'S', 1, "nothing\0".into(), "A=b\0".into());
    add(
        800_005,
        'S',
        1,
        "other\0".into(),
        "CELLCHECK_MARKER=ccm-elsewhere\0".into(),
    );
    after.procs.get_mut(&(800_005, 7)).unwrap().cgroup = format!("0::/cc-{tok}-cell-09");
    after
        .cgroups
        .insert(format!("/sys/fs/cgroup/pids/cc-{tok}-cell-01").into());
    after
        .cgroups
        .insert("/sys/fs/cgroup/pids/user.slice".into());
    after.mounts.insert(format!(
        "/run/x/cc-{tok}-cell-02/rootfs (source overlay, type overlay)"
    ));
    after.netns.insert(format!("cc-{tok}-cell-10"));
    after
        .loops
        .insert(format!("/dev/loop3 backed by /tmp/rt-{tok}-11.img"));
    let meta = FileMeta {
        size: 1,
        mode: 0o040755,
        mtime_ns: 0,
    };
    after
        .files
        .insert(format!("/run/rt/cc-{tok}-cell-08").into(), meta);
    after
        .files
        .insert(format!("/run/rt/cc-{tok}-cell-08/state.json").into(), meta);
    after.files.insert("/run/rt/unrelated".into(), meta);
    let mut found: Vec<String> = scoped(&cells, &Snapshot::default(), &after)
        .into_iter()
        .filter(|(_, l)| !matches!(l, Leftover::Secret { .. }))
        .map(|(c, l)| match l {
            Leftover::CgroupDir(p) | Leftover::File(p) => format!("{c} {}", p.display()),
            Leftover::Mount(n) | Leftover::Netns(n) | Leftover::Loop(n) => format!("{c} {n}"),
            l => format!("{c} {l}"),
        })
        .collect();
    found.sort();
    let mut expected = scoped_one_by_one(&cells, &after);
    // The one-by-one search lists a leftover tree's contents too; scoped names its top only.
    expected.retain(|e| !e.ends_with("state.json"));
    assert_eq!(found, expected);
    // Every kind was exercised, by the cell it names and by the trial's prefix.
    for i in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] {
        let c = format!("cc-{tok}-cell-{i:02} ");
        assert!(
            found.iter().any(|f| f.starts_with(&c)),
            "cell {i}: {found:#?}"
        );
    }
    assert!(!found
        .iter()
        .any(|f| f.contains("unrelated") || f.contains("user.slice")));
    assert!(!found.iter().any(|f| f.contains("850008")));
}
