//! Serves a built-in backend over the cellcheck driver protocol (see `docs/protocol.md`).
//!
//! ```text
//! cellcheck-driver [--connect SOCKET] host [--rootfs DIR] [--init PATH] [--state-root DIR] [--name NAME]
//! ```
//!
//! Requests arrive on stdin, responses leave on stdout, one JSON object per line; stderr is the log.
//! Without `--rootfs`/`--init`, the cell root and init are the fixtures the client names in `hello`
//! (else the fixtures are found or built as the suite does).
//! With `--connect`, the protocol runs over a unix stream socket instead (how a driver inside a
//! cell reaches the client outside). Requests are served concurrently. When the input closes or a
//! `shutdown` arrives, every cell is destroyed before the driver exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cellcheck_contract::{Backend, CellError, Retry};
use cellcheck_host::{HostBackend, HostConfig};
use cellcheck_remote::protocol::{
    capabilities_to_wire, CreateParams, ExecParams, FixturePaths, HelloParams, HelloResult,
    IdParams, Request, Response, RestoreParams, SnapshotParams, MAX_LINE_BYTES, PROTOCOL_VERSION,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

const USAGE: &str = "usage: cellcheck-driver [--connect SOCKET] host [--rootfs DIR] [--init PATH] [--state-root DIR] [--name NAME]";

struct Args {
    connect: Option<PathBuf>,
    rootfs: Option<PathBuf>,
    init: Option<PathBuf>,
    state_root: Option<PathBuf>,
    name: Option<String>,
}

fn parse_args(it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut it = it.peekable();
    let mut connect = None;
    let mut backend = None;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--connect" => {
                connect = Some(PathBuf::from(it.next().ok_or("--connect needs a path")?))
            }
            "host" => {
                backend = Some(a);
                break;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown backend or option {other:?}\n{USAGE}")),
        }
    }
    if backend.is_none() {
        return Err(format!("no backend named\n{USAGE}"));
    }
    let (mut rootfs, mut init, mut state_root, mut name) = (None, None, None, None);
    while let Some(a) = it.next() {
        let mut val = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "--rootfs" => rootfs = Some(PathBuf::from(val("--rootfs")?)),
            "--init" => init = Some(PathBuf::from(val("--init")?)),
            "--state-root" => state_root = Some(PathBuf::from(val("--state-root")?)),
            "--name" => name = Some(val("--name")?),
            other => return Err(format!("unknown host option {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        connect,
        rootfs,
        init,
        state_root,
        name,
    })
}

/// The host backend's configuration: the flags first, then the fixtures the client named in
/// `hello`, and only without either the fixtures found (or built) the usual way.
fn host_config(args: &Args, hello: Option<&FixturePaths>) -> Result<HostConfig, String> {
    let rootfs = args
        .rootfs
        .clone()
        .or_else(|| hello.map(|f| PathBuf::from(&f.rootfs)));
    let init = args
        .init
        .clone()
        .or_else(|| hello.map(|f| PathBuf::from(&f.host_init)));
    let mut host = match (rootfs, init) {
        (Some(r), Some(i)) => HostConfig::new(i, r),
        (r, i) => {
            let fx = cellcheck_fixtures::ensure().map_err(|e| e.to_string())?;
            let mut c = HostConfig::from_fixtures(&fx);
            if let Some(r) = r {
                c.rootfs = r;
            }
            if let Some(i) = i {
                c.init = i;
            }
            c
        }
    };
    if let Some(s) = &args.state_root {
        host.state_root = s.clone();
    }
    if let Some(n) = &args.name {
        host.name = n.clone();
    }
    Ok(host)
}

/// The fixtures a `hello` line names, if it is one and names them.
fn hello_fixtures(line: &[u8]) -> Option<FixturePaths> {
    let req: Request = serde_json::from_slice(line).ok()?;
    if req.op != "hello" {
        return None;
    }
    serde_json::from_value::<HelloParams>(req.params)
        .ok()?
        .fixtures
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cellcheck-driver: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cellcheck-driver: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (backend, res) = rt.block_on(async {
        match &args.connect {
            Some(path) => match tokio::net::UnixStream::connect(path).await {
                Ok(s) => {
                    let (r, w) = s.into_split();
                    run(&args, r, w).await
                }
                Err(e) => (None, Err(format!("connect {}: {e}", path.display()))),
            },
            None => run(&args, tokio::io::stdin(), tokio::io::stdout()).await,
        }
    });
    // Drop destroys any cell still tracked, even when serving failed.
    drop(backend);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cellcheck-driver: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Build the backend (from the first request when it is the `hello` naming the fixtures and no
/// flag named them) and serve. Returns the backend, for the caller to drop after the runtime's work.
async fn run(
    args: &Args,
    input: impl AsyncRead + Unpin,
    output: impl AsyncWrite + Unpin + Send + 'static,
) -> (Option<Arc<HostBackend>>, Result<(), String>) {
    let mut input = BufReader::new(input);
    let mut first = Vec::new();
    if args.rootfs.is_none() || args.init.is_none() {
        // The protocol starts with `hello`; it is served below like any request.
        if let Err(e) = input.read_until(b'\n', &mut first).await {
            return (None, Err(format!("read request: {e}")));
        }
    }
    let host = match host_config(args, hello_fixtures(&first).as_ref()) {
        Ok(h) => h,
        Err(e) => return (None, Err(e)),
    };
    let backend = Arc::new(HostBackend::new(host));
    let res = serve(
        backend.clone(),
        std::io::Cursor::new(first).chain(input),
        output,
    )
    .await;
    (Some(backend), res)
}

/// Serve requests until the input closes or `shutdown`; then destroy every cell.
async fn serve<B: Backend + 'static>(
    backend: Arc<B>,
    input: impl AsyncRead + Unpin,
    mut output: impl AsyncWrite + Unpin + Send + 'static,
) -> Result<(), String> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Response, bool)>();
    let writer = tokio::spawn(async move {
        while let Some((resp, last)) = rx.recv().await {
            let mut line = serde_json::to_vec(&resp).unwrap_or_default();
            line.push(b'\n');
            if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
                return;
            }
            if last {
                return;
            }
        }
    });
    let mut lines = BufReader::new(input);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = lines
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| format!("read request: {e}"))?;
        if n == 0 {
            break;
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(format!("request line longer than {MAX_LINE_BYTES} bytes"));
        }
        let req: Request = match serde_json::from_slice(&buf) {
            Ok(r) => r,
            Err(e) => {
                // No readable id to answer; id 0 tells the client its line was not understood.
                let _ = tx.send((
                    Response::err(0, &bad(format!("malformed request: {e}"))),
                    false,
                ));
                continue;
            }
        };
        if req.op == "shutdown" {
            destroy_all(backend.as_ref()).await;
            let _ = tx.send((Response::ok(req.id, json!({})), true));
            drop(tx);
            let _ = writer.await;
            return Ok(());
        }
        let (b, tx) = (backend.clone(), tx.clone());
        tokio::spawn(async move {
            let id = req.id;
            let resp = match handle(b.as_ref(), req).await {
                Ok(v) => Response::ok(id, v),
                Err(e) => Response::err(id, &e),
            };
            let _ = tx.send((resp, false));
        });
    }
    destroy_all(backend.as_ref()).await;
    drop(tx);
    let _ = writer.await;
    Ok(())
}

async fn destroy_all<B: Backend>(b: &B) {
    for id in b.list().await {
        if let Err(e) = b.destroy(&id).await {
            eprintln!("cellcheck-driver: destroy {id} at exit: {e}");
        }
    }
}

fn bad(reason: String) -> CellError {
    CellError::BackendFailure {
        reason,
        retry: Retry::NotRetryable,
    }
}

fn params<T: DeserializeOwned>(op: &str, v: Value) -> Result<T, CellError> {
    // Params may be omitted for operations that take none.
    let v = if v.is_null() { json!({}) } else { v };
    serde_json::from_value(v).map_err(|e| bad(format!("bad {op} params: {e}")))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, CellError> {
    serde_json::to_value(v).map_err(|e| CellError::failure(format!("encode result: {e}")))
}

async fn handle<B: Backend>(b: &B, req: Request) -> Result<Value, CellError> {
    if req.v != PROTOCOL_VERSION {
        return Err(bad(format!(
            "protocol version {} (this driver speaks {PROTOCOL_VERSION})",
            req.v
        )));
    }
    let op = req.op.as_str();
    let p = req.params;
    match op {
        "hello" => {
            let h: HelloParams = params(op, p)?;
            if !h.versions.contains(&PROTOCOL_VERSION) {
                return Err(CellError::Unavailable {
                    reason: format!(
                        "client speaks versions {:?}, this driver {PROTOCOL_VERSION}",
                        h.versions
                    ),
                });
            }
            to_value(HelloResult {
                version: PROTOCOL_VERSION,
                backend: b.name().to_string(),
                driver: format!("cellcheck-driver {}", env!("CARGO_PKG_VERSION")),
            })
        }
        "capabilities" => Ok(capabilities_to_wire(&b.capabilities())),
        "attributes" => to_value(b.attributes()),
        "preflight" => to_value(b.preflight().await),
        "create" => {
            let c: CreateParams = params(op, p)?;
            to_value(b.create(&c.document).await?)
        }
        "wait" => to_value(b.wait(&params::<IdParams>(op, p)?.id).await?),
        "exec" => {
            let e: ExecParams = params(op, p)?;
            to_value(b.exec(&e.id, e.request).await?)
        }
        "destroy" => to_value(b.destroy(&params::<IdParams>(op, p)?.id).await?),
        "list" => Ok(json!({ "ids": b.list().await })),
        "footprint" => to_value(b.footprint(&params::<IdParams>(op, p)?.id)),
        "snapshot" => to_value(b.snapshot(&params::<IdParams>(op, p)?.id).await?),
        "restore" => {
            let r: RestoreParams = params(op, p)?;
            to_value(b.restore(&r.snapshot, &r.new_id).await?)
        }
        "delete_snapshot" => {
            let s: SnapshotParams = params(op, p)?;
            b.delete_snapshot(&s.snapshot).await?;
            Ok(json!({}))
        }
        "pause" => {
            b.pause(&params::<IdParams>(op, p)?.id).await?;
            Ok(json!({}))
        }
        "resume" => {
            b.resume(&params::<IdParams>(op, p)?.id).await?;
            Ok(json!({}))
        }
        other => Err(bad(format!("unknown operation {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> Args {
        parse_args(["host"].iter().chain(flags).map(|s| s.to_string())).unwrap()
    }

    #[test]
    fn the_rootfs_and_init_come_from_hello_unless_flags_name_them() {
        let line = br#"{"v":1,"id":1,"op":"hello","params":{"versions":[1],"client":"c","fixtures":{"rootfs":"/fx/rootfs","probe":"/fx/probe","host_init":"/fx/init"}}}"#;
        let hello = hello_fixtures(line).expect("hello names fixtures");
        let c = host_config(&args(&[]), Some(&hello)).unwrap();
        assert_eq!(
            (c.rootfs, c.init),
            (PathBuf::from("/fx/rootfs"), PathBuf::from("/fx/init"))
        );
        let c = host_config(&args(&["--rootfs", "/mine", "--init", "/i"]), Some(&hello)).unwrap();
        assert_eq!(
            (c.rootfs, c.init),
            (PathBuf::from("/mine"), PathBuf::from("/i"))
        );
        // Not a hello, or one without fixtures: nothing taken from it.
        assert_eq!(
            hello_fixtures(br#"{"v":1,"id":1,"op":"list","params":{}}"#),
            None
        );
        assert_eq!(
            hello_fixtures(
                br#"{"v":1,"id":1,"op":"hello","params":{"versions":[1],"client":"c"}}"#
            ),
            None
        );
    }
}
