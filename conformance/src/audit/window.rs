//! The per-window check: a snapshot before the first trial of this process and after its last, new
//! things blamed by cell or ancestry.

use super::*;

/// One trial as the window remembers it.
#[derive(Debug, Clone)]
pub(super) struct TrialRec {
    pub(super) backend: String,
    pub(super) name: String,
    pub(super) cells: Vec<Needles>,
    pub(super) start: u64,
    pub(super) end: Option<u64>,
}

#[derive(Default)]
pub(super) struct WindowState {
    pub(super) active: usize,
    pub(super) baseline: Option<std::sync::Arc<Snapshot>>,
    pub(super) trials: Vec<TrialRec>,
    pub(super) extra_roots: Vec<PathBuf>,
    /// Backends with live cells of other harness processes when the window opened.
    pub(super) others_at_open: BTreeSet<String>,
}

/// The per-process audit window: opened by the first running trial, closed by the last.
pub struct Window {
    pub(super) st: Mutex<WindowState>,
}

/// What a closed window found, per backend.
#[derive(Debug, Clone, Default)]
pub struct WindowReport {
    /// Backend name → leftovers (already described, with their trial when known).
    pub leftovers: BTreeMap<String, Vec<String>>,
    /// The backends whose trials ran in the window.
    pub backends: BTreeSet<String>,
    /// What was seen but cannot be pinned on this window's backends (printed, never failed).
    pub warnings: Vec<String>,
}

pub(super) static WINDOW: Window = Window {
    st: Mutex::new(WindowState {
        active: 0,
        baseline: None,
        trials: Vec::new(),
        extra_roots: Vec::new(),
        others_at_open: BTreeSet::new(),
    }),
};

/// The process's window.
pub fn window() -> &'static Window {
    &WINDOW
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A trial starts; returns its index. The first one takes the baseline.
    pub fn open(&self, backend: &str, name: &str) -> usize {
        let mut st = self.lock();
        if st.active == 0 {
            let roots = st.extra_roots.clone();
            st.baseline = Some(std::sync::Arc::new(Snapshot::take_baseline(&roots)));
            st.trials.clear();
            st.others_at_open = crate::ledger::live_backends_elsewhere();
        }
        st.active += 1;
        st.trials.push(TrialRec {
            backend: backend.into(),
            name: name.into(),
            cells: Vec::new(),
            start: now_ticks(),
            end: None,
        });
        st.trials.len() - 1
    }

    /// Add backend state roots to the audited file areas (from the next baseline on).
    pub fn add_roots(&self, roots: impl IntoIterator<Item = PathBuf>) {
        let mut st = self.lock();
        for r in roots {
            if !st.extra_roots.contains(&r) {
                st.extra_roots.push(r);
            }
        }
    }

    /// The audited extra roots.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.lock().extra_roots.clone()
    }

    /// The baseline of the open window.
    pub fn baseline(&self) -> Option<std::sync::Arc<Snapshot>> {
        self.lock().baseline.clone()
    }

    /// Trial `i` ends with `cells`. When it was the last running one the window closes: a new
    /// snapshot is compared with the baseline.
    ///
    /// `after`, when given, is a snapshot the caller just took (it is used instead of a new one).
    /// Leftovers that mention a cell of trial `i` itself are left out: its own scoped check
    /// reported them already.
    pub fn close(
        &self,
        i: usize,
        cells: Vec<Needles>,
        after: Option<Snapshot>,
    ) -> Option<WindowReport> {
        let mut st = self.lock();
        if let Some(t) = st.trials.get_mut(i) {
            t.cells = cells;
            t.end = Some(now_ticks());
        }
        st.active = st.active.saturating_sub(1);
        if st.active > 0 {
            return None;
        }
        let before = st.baseline.take()?;
        let roots = st.extra_roots.clone();
        let mut trials = std::mem::take(&mut st.trials);
        drop(st);
        let after = after.unwrap_or_else(|| Snapshot::take_since(&roots, Some(&before)));
        let skip: Vec<Needles> = trials
            .get_mut(i)
            .map(|t| t.cells.clone())
            .unwrap_or_default();
        let mut others = std::mem::take(&mut self.lock().others_at_open);
        others.extend(crate::ledger::live_backends_elsewhere());
        let mut rep = diff_window(&before, &after, &trials, &skip);
        rootfs_changes(&before, &after, &trials, &others, &mut rep);
        Some(rep)
    }
}

pub(super) fn diff_window(
    before: &Snapshot,
    after: &Snapshot,
    trials: &[TrialRec],
    reported: &[Needles],
) -> WindowReport {
    let mut rep = WindowReport {
        backends: trials.iter().map(|t| t.backend.clone()).collect(),
        ..WindowReport::default()
    };
    let mut add = |backend: &str, what: String| {
        rep.leftovers
            .entry(backend.to_string())
            .or_default()
            .push(what);
    };
    // Whatever mentions a cell of the window: that cell's trial.
    let all: Vec<(&TrialRec, &Needles)> = trials
        .iter()
        .flat_map(|t| t.cells.iter().map(move |c| (t, c)))
        .collect();
    let needles: Vec<Needles> = all.iter().map(|(_, c)| (*c).clone()).collect();
    let ix = CellIndex::new(&needles);
    // Each cell's processes (by its reason or the host pid it reported), to claim them.
    let mut owned: Vec<Vec<(u32, u64)>> = vec![Vec::new(); needles.len()];
    for (k, p) in &after.procs {
        for i in ix.candidates(p) {
            if needles[i].process_reason(p).is_some() || needles[i].host_pids.contains(k) {
                owned[i].push(*k);
            }
        }
    }
    let mut claimed: BTreeSet<(u32, u64)> = BTreeSet::new();
    // A cell whose trial's own check already reported what mentions it (against this same
    // snapshot) only claims its processes, so they are not blamed again below. A full search
    // for it here would double the audit's cost of every trial.
    let mut rest = Vec::new();
    for (i, (_, c)) in all.iter().enumerate() {
        if reported
            .iter()
            .any(|r| r.cell == c.cell && r.marker == c.marker)
        {
            claimed.extend(&owned[i]);
        } else {
            rest.push(i);
        }
    }
    let rest_needles: Vec<Needles> = rest.iter().map(|&i| needles[i].clone()).collect();
    for (j, l) in scoped_by_index(&CellIndex::new(&rest_needles), before, after) {
        let i = rest[j];
        let (t, c) = all[i];
        if let Leftover::Process { .. } | Leftover::Zombie { .. } = &l {
            claimed.extend(&owned[i]);
        }
        add(
            &t.backend,
            format!("{l} (cell {}, trial {})", c.cell, t.name),
        );
    }
    // New processes of ours that mention no cell: descendants of this harness, and zombie
    // children. Attributed by start time to the backends whose trials were running then.
    let me = std::process::id();
    for (k, p) in &after.procs {
        if before.procs.contains_key(k) || claimed.contains(k) {
            continue;
        }
        let zombie = p.state == 'Z' && p.ppid == me;
        if !(zombie || p.runnable() && after.descends_from_me(p)) {
            continue;
        }
        let running: BTreeSet<&str> = trials
            .iter()
            .filter(|t| t.start <= p.start && !matches!(t.end, Some(e) if p.start > e + 1))
            .map(|t| t.backend.as_str())
            .collect();
        let what = if zombie {
            Leftover::Zombie { pid: p.pid }.to_string()
        } else {
            Leftover::Process {
                proc_: p.describe(),
                why: "a descendant of the harness that mentions no cell".into(),
            }
            .to_string()
        };
        if running.len() == 1 {
            add(
                running.first().unwrap(),
                format!("{what}, started during its trials"),
            );
        } else if running.is_empty() {
            // Started between trials of this process: each backend of the window is a suspect.
            for b in &rep.backends.clone() {
                add(b, format!("{what}, started between trials"));
            }
        } else {
            let names: Vec<&str> = running.iter().copied().collect();
            for b in &running {
                add(
                    b,
                    format!(
                        "{what}, started while trials of {} ran",
                        names.join(" and ")
                    ),
                );
            }
        }
    }
    for v in rep.leftovers.values_mut() {
        v.sort();
        v.dedup();
    }
    rep
}
