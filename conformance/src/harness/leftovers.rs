//! The residue check of a trial's cells: the backend's footprint and the host audit, merged into
//! one message.

use super::*;

impl Ctx {
    fn scope_of(&self, c: &CellRec) -> Scope {
        let footprint = if c.id.is_empty() {
            Default::default()
        } else {
            self.inner.backend.footprint(&c.id)
        };
        Scope {
            cell: c.id.clone(),
            env_markers: if c.marker.is_empty() {
                vec![]
            } else {
                vec![c.marker.clone()]
            },
            footprint,
            host_pids: c.host_pids.clone(),
            check_resources: c.check_resources,
        }
    }

    /// Fail unless nothing of cell `id` remains on the host (after its destroy or failed create).
    pub async fn assert_clean(&self, id: &str) -> Result<(), Failure> {
        self.step(format!("residue check of {id}"));
        let t = Instant::now();
        let recs: Vec<CellRec> = self
            .st()
            .cells
            .iter()
            .filter(|c| c.id == id)
            .cloned()
            .collect();
        // Fds are checked per trial against the fds open before it; here only the rest.
        let (reports, _) = self.leftovers(&recs, None, None).await;
        self.st().checks += t.elapsed();
        match reports.into_iter().next() {
            Some((_, text)) => Err(self.fail(text)),
            None => Ok(()),
        }
    }

    /// What of `recs` is still on the host: the footprint's resources (the backend's word) and
    /// everything the host audit finds mentioning the cells (no word needed), as one report per
    /// leaking cell, plus the snapshot the audit took. Processes another live cell of the trial
    /// claims by its own id or pid are that cell's, not these ones'. `released` names cells the
    /// scenario already checked and forgot ([`Ctx::released_needles`]): looked for by the audit.
    ///
    /// Only what is freed asynchronously after every process of the cell is dead (a zombie
    /// awaiting its reaper, a veth or loop device being released) is looked at again, for at
    /// most [`RESIDUE_GRACE`]; anything else fails at once.
    pub(super) async fn leftovers(
        &self,
        recs: &[CellRec],
        fds_before: Option<&BTreeMap<i32, PathBuf>>,
        released: Option<Needles>,
    ) -> (Vec<(String, String)>, Option<audit::Snapshot>) {
        let others = {
            let ids: Vec<&str> = recs.iter().map(|c| c.id.as_str()).collect();
            self.other_live_needles(&ids)
        };
        let mut needles: Vec<Needles> = recs.iter().map(|c| self.needles(c)).collect();
        needles.extend(released);
        let roots = audit::window().roots();
        let scopes: Vec<Scope> = recs.iter().map(|c| self.scope_of(c)).collect();
        // The footprint's markers of every cell, searched at once: each cell's footprint check
        // then looks only at the processes that mention one of its markers at all (what
        // `residue::process_marker` matches is a marker occurring in the cmdline or environ).
        let markers = audit::NeedleIndex::new(scopes.iter().enumerate().flat_map(|(i, s)| {
            s.env_markers
                .iter()
                .chain(&s.footprint.process_markers)
                .map(move |m| (i, m.as_bytes()))
        }));
        let no_fds = BTreeMap::new();
        let start = Instant::now();
        loop {
            let baseline = audit::window().baseline();
            // At the trial's end (fds to compare) the look also closes the audit window, which
            // compares the shared rootfs; a scenario's own check does not.
            let after = if fds_before.is_some() {
                audit::Snapshot::take_since(&roots, baseline.as_deref())
            } else {
                audit::Snapshot::take_scoped(&roots, baseline.as_deref())
            };
            let before = baseline.as_deref().unwrap_or(&after);
            let mut per_cell: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut settling = true;
            let view = residue::HostView::with(
                after
                    .procs
                    .values()
                    .map(|p| residue::ProcInfo {
                        pid: p.pid,
                        ppid: p.ppid,
                        state: p.state,
                        cmdline: p.cmdline.clone(),
                        environ: p.environ.clone(),
                    })
                    .collect(),
                after.fds.clone(),
            );
            let mut marked: Vec<Vec<&residue::ProcInfo>> = vec![Vec::new(); scopes.len()];
            for p in &view.procs {
                let mut owners = std::collections::BTreeSet::new();
                markers.owners_in(&[&p.cmdline, &p.environ], &mut owners);
                for i in owners {
                    marked[i].push(p);
                }
            }
            for (c, (scope, procs)) in recs.iter().zip(scopes.iter().zip(marked)) {
                let leaks = residue::scan_in(scope, fds_before.unwrap_or(&no_fds), &view, procs);
                for l in leaks {
                    if fds_before.is_none() && matches!(l, residue::Leak::Fd { .. }) {
                        continue;
                    }
                    settling &= matches!(l, residue::Leak::Zombie { .. });
                    per_cell
                        .entry(c.id.clone())
                        .or_default()
                        .push(l.to_string());
                }
            }
            for (cell, l) in audit::scoped(&needles, before, &after) {
                if let audit::Leftover::Process { .. } = &l {
                    let pid = leftover_pid(&l);
                    let proc_ = after.procs.values().find(|p| Some(p.pid) == pid);
                    if proc_.is_some_and(|p| others.iter().any(|o| o.process_reason(p).is_some())) {
                        continue;
                    }
                }
                settling &= matches!(
                    l,
                    audit::Leftover::Zombie { .. }
                        | audit::Leftover::Link(_)
                        | audit::Leftover::Loop(_)
                );
                let text = format!("{l} [host audit]");
                let v = per_cell.entry(cell).or_default();
                // The footprint check may already name the same pid or path.
                if !v.iter().any(|x| same_thing(x, &l)) {
                    v.push(text);
                }
            }
            if per_cell.is_empty() || !settling || start.elapsed() >= RESIDUE_GRACE {
                let reports = per_cell
                    .into_iter()
                    .map(|(cell, v)| {
                        let mut s =
                            format!("residue of cell {cell}: {} leaked resource(s)", v.len());
                        for l in v {
                            s.push_str("\n  - ");
                            s.push_str(&l);
                        }
                        (cell, s)
                    })
                    .collect();
                return (reports, Some(after));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn outputs_report(&self) -> String {
        let st = self.st();
        let mut s = String::new();
        for (what, r) in st.outputs.iter().rev().take(4) {
            s.push_str(&format!(
                "\n  {what}: {:?}\n    stdout: {}\n    stderr: {}",
                r.termination,
                clip(&r.stdout),
                clip(&r.stderr)
            ));
        }
        s
    }
}

fn leftover_pid(l: &audit::Leftover) -> Option<u32> {
    match l {
        audit::Leftover::Process { proc_, .. } => {
            proc_.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
        }
        audit::Leftover::Zombie { pid } => Some(*pid),
        _ => None,
    }
}

/// Whether the footprint check's line `x` already names what the audit found.
fn same_thing(x: &str, l: &audit::Leftover) -> bool {
    match l {
        audit::Leftover::Process { .. } | audit::Leftover::Zombie { .. } => leftover_pid(l)
            .is_some_and(|p| x.contains(&format!("pid {p} ")) || x.ends_with(&format!("pid {p}"))),
        audit::Leftover::CgroupDir(p) | audit::Leftover::File(p) => {
            x.contains(&format!(" {} still exists", p.display()))
        }
        audit::Leftover::Netns(n) => x.contains(&format!("netns {n} ")),
        _ => false,
    }
}

fn clip(b: &[u8]) -> String {
    const MAX: usize = 600;
    let s = String::from_utf8_lossy(&b[..b.len().min(MAX)]).into_owned();
    if b.len() > MAX {
        format!("{s:?}… ({} bytes)", b.len())
    } else {
        format!("{s:?}")
    }
}
