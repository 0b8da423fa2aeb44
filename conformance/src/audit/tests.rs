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
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .env(MARKER_VAR, format!("ccm-{tok}"))
        .spawn()
        .unwrap();
    // Until it has exec'd, the child is a copy of this process without the marker.
    while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
        .is_ok_and(|c| c.starts_with(b"sleep\0"))
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
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
