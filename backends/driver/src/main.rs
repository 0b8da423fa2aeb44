//! Serves a built-in backend over the cellcheck driver protocol (see `docs/protocol.md`).
//!
//! ```text
//! cellcheck-driver [--connect SOCKET] host [--rootfs DIR] [--init PATH] [--state-root DIR] [--name NAME]
//! ```
//!
//! Requests arrive on stdin, responses leave on stdout, one JSON object per line; stderr is the log.
//! With `--connect`, the protocol runs over a unix stream socket instead (how a driver inside a
//! cell reaches the client outside). Requests are served concurrently. When the input closes or a
//! `shutdown` arrives, every cell is destroyed before the driver exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cellcheck_contract::{Backend, CellError, Retry};
use cellcheck_host::{HostBackend, HostConfig};
use cellcheck_remote::protocol::{
    capabilities_to_wire, CreateParams, ExecParams, HelloParams, HelloResult, IdParams, Request,
    Response, RestoreParams, SnapshotParams, MAX_LINE_BYTES, PROTOCOL_VERSION,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

const USAGE: &str = "usage: cellcheck-driver [--connect SOCKET] host [--rootfs DIR] [--init PATH] [--state-root DIR] [--name NAME]";

struct Args {
    connect: Option<PathBuf>,
    host: HostConfig,
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
    let mut host = match (rootfs, init) {
        (Some(r), Some(i)) => HostConfig::new(i, r),
        (r, i) => {
            // Outside a cell the fixtures can be found (or built) the usual way.
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
    if let Some(s) = state_root {
        host.state_root = s;
    }
    if let Some(n) = name {
        host.name = n;
    }
    Ok(Args { connect, host })
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
    let backend = Arc::new(HostBackend::new(args.host));
    let res = rt.block_on(async {
        match &args.connect {
            Some(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("connect {}: {e}", path.display()))?;
                let (r, w) = s.into_split();
                serve(backend.clone(), r, w).await
            }
            None => serve(backend.clone(), tokio::io::stdin(), tokio::io::stdout()).await,
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
