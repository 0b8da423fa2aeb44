//! Trace capture: a tracing layer that files every event and span of a backend under the cell id
//! its span carries, so a failing trial's message can end with what its backend did on the way.
//!
//! Backends run their work on tokio tasks and blocking threads, so the layer routes a line by the
//! `cell` field of the event or of the innermost span around it that has one (a span without the
//! field inherits its parent's), never by thread. Each cell keeps its last [`LINES_PER_CELL`]
//! lines; at most [`MAX_CELLS`] cells are kept, the oldest dropped first (cells no trial claims:
//! a preflight's, a backend's own helpers).
//!
//! `CELLCHECK_TRACE` is the capture's filter (tracing's `RUST_LOG` syntax, default `debug`; `off`
//! turns capture off). `RUST_LOG`, when set, also prints the events it selects to stderr live.

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, SpanRef};
use tracing_subscriber::{EnvFilter, Layer};

/// Lines kept per cell: enough for every operation of a scenario's cell at debug level (a host
/// cell's create → wait → destroy is about 20), and still readable at the end of a message.
pub const LINES_PER_CELL: usize = 200;
/// Cells kept at once.
pub const MAX_CELLS: usize = 512;
/// A longer line is cut (a backend logging a whole config or captured output).
const MAX_LINE: usize = 600;

/// The capture filter's variable.
pub const TRACE_VAR: &str = "CELLCHECK_TRACE";
const DEFAULT_FILTER: &str = "debug";

/// The lines of one cell, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellTrace {
    pub lines: Vec<String>,
    /// Older lines dropped to keep within [`LINES_PER_CELL`].
    pub dropped: usize,
}

#[derive(Default)]
struct CellLog {
    lines: VecDeque<String>,
    dropped: usize,
}

/// Where captured lines go, by cell id.
#[derive(Default)]
pub struct Store {
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    cells: HashMap<String, CellLog>,
    /// Cell ids in the order their first line came, to drop the oldest cell first.
    order: VecDeque<String>,
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, cell: &str, mut line: String) {
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" …");
        }
        let mut st = self.lock();
        if !st.cells.contains_key(cell) {
            while st.order.len() >= MAX_CELLS {
                if let Some(old) = st.order.pop_front() {
                    st.cells.remove(&old);
                }
            }
            st.order.push_back(cell.to_string());
        }
        let log = st.cells.entry(cell.to_string()).or_default();
        if log.lines.len() == LINES_PER_CELL {
            log.lines.pop_front();
            log.dropped += 1;
        }
        log.lines.push_back(line);
    }

    /// Take (and forget) the lines of every cell `wanted` accepts, in the order the cells first
    /// traced.
    pub fn take(&self, wanted: impl Fn(&str) -> bool) -> Vec<(String, CellTrace)> {
        let mut st = self.lock();
        let ids: Vec<String> = st.order.iter().filter(|c| wanted(c)).cloned().collect();
        st.order.retain(|c| !wanted(c));
        ids.into_iter()
            .filter_map(|id| {
                let log = st.cells.remove(&id)?;
                Some((
                    id,
                    CellTrace {
                        lines: log.lines.into(),
                        dropped: log.dropped,
                    },
                ))
            })
            .collect()
    }
}

/// The layer that fills a [`Store`].
pub struct CaptureLayer {
    store: Arc<Store>,
}

impl CaptureLayer {
    pub fn new(store: Arc<Store>) -> Self {
        CaptureLayer { store }
    }
}

/// What the layer keeps on a span: its cell (own or inherited), its name and other fields.
struct SpanInfo {
    cell: Option<String>,
    text: String,
    opened: Instant,
}

/// Fields as `name=value` text; `cell` and `message` apart.
#[derive(Default)]
struct Fields {
    cell: Option<String>,
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "cell" => self.cell = Some(value.to_string()),
            "message" => self.message = value.to_string(),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "cell" => self.cell = Some(format!("{value:?}")),
            "message" => self.message = format!("{value:?}"),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

impl<S> Layer<S> for CaptureLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut f = Fields::default();
        attrs.record(&mut f);
        let cell = f.cell.or_else(|| {
            span.parent()
                .and_then(|p| p.extensions().get::<SpanInfo>()?.cell.clone())
        });
        let text = if f.rest.is_empty() {
            span.name().to_string()
        } else {
            format!("{}{{{}}}", span.name(), f.rest.trim_start())
        };
        if let Some(c) = &cell {
            let chain = chain(span.scope().from_root());
            let chain = if chain.is_empty() {
                text.clone()
            } else {
                format!("{chain}:{text}")
            };
            self.store.push(
                c,
                format!("{} {:>5} {chain}: begin", now(), attrs.metadata().level()),
            );
        }
        span.extensions_mut().insert(SpanInfo {
            cell,
            text,
            opened: Instant::now(),
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut f = Fields::default();
        values.record(&mut f);
        let mut ext = span.extensions_mut();
        if let Some(info) = ext.get_mut::<SpanInfo>() {
            if f.cell.is_some() {
                info.cell = f.cell;
            }
            if !f.rest.is_empty() {
                let open = info.text.ends_with('}');
                if open {
                    info.text.pop();
                    info.text.push_str(&f.rest);
                    info.text.push('}');
                } else {
                    info.text = format!("{}{{{}}}", info.text, f.rest.trim_start());
                }
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let scope: Vec<_> = ctx
            .event_scope(event)
            .map(|s| s.from_root().collect())
            .unwrap_or_default();
        let cell = f.cell.clone().or_else(|| {
            scope
                .iter()
                .rev()
                .find_map(|s| s.extensions().get::<SpanInfo>()?.cell.clone())
        });
        let Some(cell) = cell else { return };
        let chain = chain(scope.into_iter());
        let meta = event.metadata();
        let at = if chain.is_empty() {
            meta.target().to_string()
        } else {
            chain
        };
        self.store.push(
            &cell,
            format!(
                "{} {:>5} {at}: {}{}",
                now(),
                meta.level(),
                f.message,
                f.rest
            ),
        );
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        // Read and released before `chain` reads the extensions again.
        let Some((cell, opened)) = span
            .extensions()
            .get::<SpanInfo>()
            .and_then(|i| Some((i.cell.clone()?, i.opened)))
        else {
            return;
        };
        let chain = chain(span.scope().from_root());
        self.store.push(
            &cell,
            format!(
                "{} {:>5} {chain}: end after {} ms",
                now(),
                span.metadata().level(),
                opened.elapsed().as_millis()
            ),
        );
    }
}

/// `outer{..}:inner{..}` of the spans given root first.
fn chain<'a, R: LookupSpan<'a> + 'a>(spans: impl Iterator<Item = SpanRef<'a, R>>) -> String {
    let mut s = String::new();
    for span in spans {
        if let Some(info) = span.extensions().get::<SpanInfo>() {
            if !s.is_empty() {
                s.push(':');
            }
            s.push_str(&info.text);
        }
    }
    s
}

/// UTC time of day with milliseconds, to line a trace up with a runtime's own logs.
fn now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// What [`install`] set up.
enum Installed {
    Capturing {
        filter: String,
        store: Arc<Store>,
    },
    /// `CELLCHECK_TRACE=off`.
    Off,
    /// Another global subscriber was installed first (the program's own): its choice stands.
    Taken,
}

static INSTALLED: OnceLock<Result<Installed, String>> = OnceLock::new();

/// Install the capture as the process's global subscriber, once. An invalid `CELLCHECK_TRACE` or
/// `RUST_LOG` is an error (the caller shows it); a program that installed its own global
/// subscriber keeps it, and failure messages say no trace was captured.
pub fn install() -> Result<(), String> {
    INSTALLED
        .get_or_init(|| {
            let f = Filters::parse(
                std::env::var(TRACE_VAR).ok().as_deref(),
                std::env::var("RUST_LOG").ok().as_deref(),
            )?;
            let Some(capture) = f.capture else {
                if let Some(live) = f.live {
                    let _ = tracing::subscriber::set_global_default(
                        tracing_subscriber::registry().with(live_layer(live)),
                    );
                }
                return Ok(Installed::Off);
            };
            let store = Arc::new(Store::default());
            let sub = tracing_subscriber::registry()
                .with(CaptureLayer::new(store.clone()).with_filter(capture))
                .with(f.live.map(live_layer));
            Ok(match tracing::subscriber::set_global_default(sub) {
                Ok(()) => Installed::Capturing {
                    filter: f.text,
                    store,
                },
                Err(_) => Installed::Taken,
            })
        })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// The capture's and the live printer's filters, from `CELLCHECK_TRACE` and `RUST_LOG`.
struct Filters {
    /// `None`: capture off.
    capture: Option<EnvFilter>,
    /// The capture's filter as the user wrote it (or the default), for failure messages.
    text: String,
    live: Option<EnvFilter>,
}

impl Filters {
    /// An invalid value is an error naming its variable: a misspelt filter must not quietly
    /// capture nothing.
    fn parse(trace: Option<&str>, rust_log: Option<&str>) -> Result<Filters, String> {
        let text = trace.unwrap_or(DEFAULT_FILTER).trim().to_string();
        let live = match rust_log.map(str::trim) {
            Some(v) if !v.is_empty() => {
                Some(EnvFilter::try_new(v).map_err(|e| format!("RUST_LOG={v:?}: {e}"))?)
            }
            _ => None,
        };
        let capture = match text.as_str() {
            "off" => None,
            t => Some(EnvFilter::try_new(t).map_err(|e| format!("{TRACE_VAR}={t:?}: {e}"))?),
        };
        Ok(Filters {
            capture,
            text,
            live,
        })
    }
}

/// `RUST_LOG`'s events printed to stderr as they happen.
fn live_layer<S>(f: EnvFilter) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(f)
}

/// Take the traces of the cells `wanted` accepts, rendered for the end of a failure message
/// (`ids` named first, each with a line even if it traced nothing). Called after every trial, so
/// what passed trials traced does not pile up.
pub fn take_report(ids: &[&str], wanted: impl Fn(&str) -> bool) -> String {
    let (filter, store) = match INSTALLED.get() {
        Some(Ok(Installed::Capturing { filter, store })) => (filter, store),
        Some(Ok(Installed::Off)) => return format!("no trace captured ({TRACE_VAR}=off)"),
        Some(Ok(Installed::Taken)) => {
            return "no trace captured (the program installed its own tracing subscriber)".into()
        }
        Some(Err(e)) => return format!("no trace captured: {e}"),
        None => return "no trace captured (capture not installed)".into(),
    };
    let traces = store.take(|c| ids.contains(&c) || wanted(c));
    render(ids, &traces, filter)
}

/// The trace section of a failure message.
pub fn render(ids: &[&str], traces: &[(String, CellTrace)], filter: &str) -> String {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for id in ids {
        if !seen.contains(id) {
            seen.push(id);
        }
    }
    for (id, _) in traces {
        if !seen.contains(&id.as_str()) {
            seen.push(id.as_str());
        }
    }
    for id in seen {
        match traces.iter().find(|(c, _)| c == id) {
            None => out.push(format!(
                "trace of cell {id}: nothing traced ({TRACE_VAR}={filter:?}; \
                 the backend has no span with this cell id)"
            )),
            Some((_, t)) => {
                let head = if t.dropped > 0 {
                    format!(
                        "trace of cell {id} (last {} of {} lines, {TRACE_VAR}={filter:?}):",
                        t.lines.len(),
                        t.lines.len() + t.dropped
                    )
                } else {
                    format!(
                        "trace of cell {id} ({} lines, {TRACE_VAR}={filter:?}):",
                        t.lines.len()
                    )
                };
                out.push(format!("{head}\n  {}", t.lines.join("\n  ")));
            }
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::{debug, info_span};

    fn dispatch() -> (tracing::Dispatch, Arc<Store>) {
        let store = Arc::new(Store::default());
        let sub = tracing_subscriber::registry().with(CaptureLayer::new(store.clone()));
        (tracing::Dispatch::new(sub), store)
    }

    fn lines(store: &Store, cell: &str) -> CellTrace {
        store
            .take(|c| c == cell)
            .pop()
            .map(|(_, t)| t)
            .unwrap_or_default()
    }

    #[test]
    fn lines_go_to_the_spans_cell_whatever_thread_emits_them() {
        let (d, store) = dispatch();
        // A span made on one thread and entered on others, as a tokio task moves between workers.
        let span = tracing::dispatcher::with_default(
            &d,
            || info_span!("host", op = "create", cell = %"cell-a"),
        );
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (d, span) = (d.clone(), span.clone());
                std::thread::spawn(move || {
                    tracing::dispatcher::with_default(&d, || {
                        let _g = span.enter();
                        // A nested span without the field inherits the cell.
                        let inner = info_span!("step", n = i);
                        let _g2 = inner.enter();
                        debug!(i, "from thread");
                        // A span of another cell inside it routes to that cell.
                        let other = info_span!("host", op = "wait", cell = "cell-b");
                        other.in_scope(|| debug!("other cell"));
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        tracing::dispatcher::with_default(&d, || {
            // No cell anywhere: not captured.
            debug!("no cell");
            // The event's own field names the cell.
            debug!(cell = "cell-b", "named by the event");
        });
        drop(span);
        let a = lines(&store, "cell-a");
        let b = lines(&store, "cell-b");
        let from = a.lines.iter().filter(|l| l.contains("from thread")).count();
        assert_eq!(from, 4, "{a:#?}");
        assert!(a.lines.iter().all(|l| !l.contains("other cell")), "{a:#?}");
        assert!(
            a.lines
                .iter()
                .any(|l| l.contains("host{op=\"create\"}:step{n=")
                    && l.contains("DEBUG")
                    && l.contains("from thread i=")),
            "{a:#?}"
        );
        assert!(a.lines[0].ends_with("host{op=\"create\"}: begin"), "{a:#?}");
        assert!(a
            .lines
            .last()
            .unwrap()
            .contains("host{op=\"create\"}: end after"));
        assert_eq!(
            b.lines.iter().filter(|l| l.contains("other cell")).count(),
            4
        );
        assert!(b.lines.iter().any(|l| l.contains("named by the event")));
        assert!(
            store.take(|_| true).is_empty(),
            "an event without a cell was kept"
        );
    }

    #[test]
    fn filters_default_to_debug_and_a_bad_one_is_an_error_naming_its_variable() {
        let f = Filters::parse(None, None).unwrap();
        assert_eq!(f.text, "debug");
        assert!(f.capture.is_some() && f.live.is_none());
        let f = Filters::parse(Some("off"), Some("cellcheck_oci=trace")).unwrap();
        assert!(f.capture.is_none() && f.live.is_some());
        let f = Filters::parse(Some("cellcheck_host=trace,info"), Some(" ")).unwrap();
        assert!(f.capture.is_some() && f.live.is_none());
        let e = Filters::parse(Some("host=loud"), None).err().unwrap();
        assert!(e.starts_with("CELLCHECK_TRACE=\"host=loud\""), "{e}");
        let e = Filters::parse(None, Some("[")).err().unwrap();
        assert!(e.starts_with("RUST_LOG=\"[\""), "{e}");
    }

    #[test]
    fn each_cell_keeps_its_last_lines_and_the_oldest_cells_go_first() {
        let (d, store) = dispatch();
        tracing::dispatcher::with_default(&d, || {
            for i in 0..LINES_PER_CELL + 50 {
                debug!(cell = "busy", i, "line");
            }
            for c in 0..MAX_CELLS + 3 {
                debug!(cell = %format!("c{c}"), "one");
            }
        });
        // "busy" was the oldest cell, so it went first; then c0..c2 (the oldest after it).
        let all = store.take(|_| true);
        assert_eq!(all.len(), MAX_CELLS);
        assert_eq!(all[0].0, "c3");
        let (d, store) = dispatch();
        tracing::dispatcher::with_default(&d, || {
            for i in 0..LINES_PER_CELL + 50 {
                debug!(cell = "busy", i, "line");
            }
        });
        let t = lines(&store, "busy");
        assert_eq!(t.lines.len(), LINES_PER_CELL);
        assert_eq!(t.dropped, 50);
        assert!(t.lines[0].ends_with("line i=50"), "{:?}", t.lines[0]);
        let r = render(&["busy", "silent"], &[("busy".into(), t)], "debug");
        assert!(r.starts_with(&format!(
            "trace of cell busy (last {LINES_PER_CELL} of {} lines",
            LINES_PER_CELL + 50
        )));
        assert!(r.contains("trace of cell silent: nothing traced"), "{r}");
    }
}
