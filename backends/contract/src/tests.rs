//! Unit tests of the contract types: capabilities, exec requests, reports and their wire form.

use super::*;

#[test]
fn undeclared_capability_is_unsupported_with_reason() {
    let c = Capabilities::default().with(Capability::Exec);
    assert!(c.has(Capability::Exec));
    assert!(matches!(
        c.support(Capability::Snapshot),
        Support::Unsupported { .. }
    ));
    assert_eq!(
        c.require(Capability::Pause),
        Err(CellError::Unsupported {
            capability: Capability::Pause
        })
    );
}

fn exec(argv: &[&str], env: &[(&str, &str)], timeout_ms: Option<u64>) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: env
            .iter()
            .map(|(n, v)| EnvVar {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        timeout_ms,
    }
}

fn field_of(r: Result<(), CellError>) -> String {
    match r {
        Err(CellError::InvalidSpec { field, .. }) => field,
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

#[test]
fn exec_requests_are_validated_naming_the_field() {
    for (req, field) in [
        (exec(&[], &[], None), "exec.argv"),
        (exec(&["/bin/true", ""], &[], None), "exec.argv[1]"),
        (exec(&["/bin/t\0rue"], &[], None), "exec.argv[0]"),
        (exec(&["/bin/true"], &[("", "v")], None), "exec.env[0].name"),
        (
            exec(&["/bin/true"], &[("A", "1"), ("B=C", "v")], None),
            "exec.env[1].name",
        ),
        (
            exec(&["/bin/true"], &[("A\0", "v")], None),
            "exec.env[0].name",
        ),
        (
            exec(&["/bin/true"], &[("A", "1"), ("A", "2")], None),
            "exec.env[1].name",
        ),
        (
            exec(&["/bin/true"], &[("A", "x\0y")], None),
            "exec.env[0].value",
        ),
        (exec(&["/bin/true"], &[], Some(0)), "exec.timeoutMs"),
        (
            exec(&["/bin/true"], &[], Some(MAX_EXEC_TIMEOUT_MS + 1)),
            "exec.timeoutMs",
        ),
    ] {
        assert_eq!(field_of(req.validate()), field, "{req:?}");
    }
}

#[test]
fn valid_exec_requests_pass_at_the_boundaries() {
    for req in [
        exec(&["/bin/true"], &[], None),
        exec(
            &["/bin/echo", "é", " "],
            &[("A", ""), ("B", "=x=")],
            Some(1),
        ),
        exec(&["x"], &[("LONG_NAME_1", "ü")], Some(MAX_EXEC_TIMEOUT_MS)),
    ] {
        assert_eq!(req.validate(), Ok(()), "{req:?}");
    }
}

#[test]
fn exit_report_json_keeps_bytes() {
    let r = ExitReport {
        termination: Termination::Signaled { signal: 9 },
        stdout: b"ok\n".to_vec(),
        stderr: vec![0xff, 0x00],
    };
    let t = serde_json::to_string(&r).unwrap();
    let back: ExitReport = serde_json::from_str(&t).unwrap();
    assert_eq!(back, r);
}

#[test]
fn errors_round_trip_as_json() {
    let e = CellError::NotFound {
        kind: ResourceKind::Program,
        id: "/nope".into(),
    };
    let t = serde_json::to_string(&e).unwrap();
    assert!(t.contains("\"error\":\"not_found\""), "{t}");
    assert_eq!(serde_json::from_str::<CellError>(&t).unwrap(), e);
}
