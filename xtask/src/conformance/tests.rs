use super::*;

fn parse_args(s: &str) -> Result<Options, clap::Error> {
    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        o: Options,
    }
    use clap::Parser;
    T::try_parse_from(std::iter::once("conformance").chain(s.split_whitespace())).map(|t| t.o)
}

#[test]
fn flags_parse_and_bad_ones_are_refused() {
    let o =
        parse_args("--backend host --backend runc --strict --repeat 3 --partition 2/4 --no-build")
            .unwrap();
    assert_eq!(parse_args("").unwrap().repeat, 1);
    assert_eq!(o.backends, ["host", "runc"]);
    assert!(o.strict && o.no_build);
    assert_eq!(o.repeat, 3);
    assert_eq!(o.partition, Some((2, 4)));
    for bad in [
        "--repeat 0",
        "--partition 5/4",
        "--partition 0/2",
        "--partition x",
        "--backend",
        "--frobnicate",
    ] {
        assert!(parse_args(bad).is_err(), "{bad}");
    }
}

#[test]
fn rerun_line_names_the_trial_and_its_env() {
    let suite = Target::suite();
    let line = rerun_command(
        "host::exit::code_42",
        &suite,
        &suite_env(&["host".into()], "linux-nokvm", false, &[]),
    );
    assert!(line.starts_with("CELLCHECK_BACKENDS=host "), "{line}");
    assert!(
        line.contains(" CELLCHECK_HOST_CLASS=linux-nokvm "),
        "{line}"
    );
    assert!(line.ends_with(" cargo nextest run -p cellcheck-conformance --test conformance -E 'test(=host::exit::code_42)'"), "{line}");
    assert!(!line.contains("CELLCHECK_STRICT"), "{line}");
    assert!(rerun_command(
        "runsc::a::b",
        &suite,
        &suite_env(&["runsc".into()], "linux-kvm", true, &[])
    )
    .contains("CELLCHECK_STRICT=1 cargo"));
    // Two drivers side by side: each trial's line carries its own driver only.
    let drivers = [
        ("one".to_string(), "python3 one.py".to_string()),
        ("two-py".to_string(), "./two".to_string()),
    ];
    let env = suite_env(
        &["host".into(), "one".into(), "two-py".into()],
        "c",
        false,
        &drivers,
    );
    let one = rerun_command("one::exit::code_0", &suite, &env);
    assert!(one.starts_with("CELLCHECK_BACKENDS=one "), "{one}");
    assert!(
        one.contains(" CELLCHECK_ONE_DRIVER='python3 one.py' cargo nextest run -p cellcheck-conformance --test conformance -E 'test(=one::exit::code_0)'"),
        "{one}"
    );
    let two = rerun_command("two-py::exit::code_0", &suite, &env);
    assert!(two.contains("CELLCHECK_TWO_PY_DRIVER=./two "), "{two}");
    assert!(!two.contains("one.py"), "{two}");
    assert!(!rerun_command("host::a::b", &suite, &env).contains("_DRIVER"));
    // An outside crate's trial reruns from its directory.
    let outside = Target {
        dir: Some("/src/my crate".into()),
        package: "mine".into(),
        test: "conformance".into(),
    };
    let line = rerun_command("mine::a::b", &outside, &outside_env("c", false));
    assert!(
        line.starts_with("cd '/src/my crate' && CELLCHECK_BACKENDS=mine "),
        "{line}"
    );
    assert!(
        line.ends_with(" cargo nextest run -p mine --test conformance -E 'test(=mine::a::b)'"),
        "{line}"
    );
}

#[test]
fn driver_and_crate_flags_parse() {
    let o =
        parse_args("--driver a=python3 --driver b-2=./drv --crate x/y --filter test(/a/)").unwrap();
    assert_eq!(
        o.drivers,
        [
            ("a".into(), "python3".into()),
            ("b-2".into(), "./drv".into())
        ]
    );
    assert_eq!(o.crates, [PathBuf::from("x/y")]);
    assert_eq!(o.filter.as_deref(), Some("test(/a/)"));
    assert!(parse_args("--driver A=x").is_err());
    assert!(parse_args("--driver a").is_err());
}

#[test]
fn missing_results_are_completed_honestly() {
    let listed = vec![
        Listed {
            name: "host::exit::code_0".into(),
            ignored: false,
            selected: true,
            filtered_out: false,
        },
        Listed {
            name: "host::exit::code_1".into(),
            ignored: false,
            selected: true,
            filtered_out: false,
        },
        Listed {
            name: "host::exit::code_2".into(),
            ignored: false,
            selected: false,
            filtered_out: false,
        },
        Listed {
            name: "host::snapshot::x".into(),
            ignored: true,
            selected: false,
            filtered_out: false,
        },
        Listed {
            name: "host::snapshot::filtered".into(),
            ignored: true,
            selected: false,
            filtered_out: true,
        },
        Listed {
            name: "crun::exit::code_0".into(),
            ignored: true,
            selected: false,
            filtered_out: false,
        },
    ];
    let ran = vec![
        crate::util::sample("host::exit::code_0", Outcome::Pass, "", 5),
        crate::util::sample("host::snapshot::filtered", Outcome::Skip, "no snapshots", 0),
    ];
    let unusable: BTreeMap<String, String> = [
        ("crun".to_string(), "crun: hybrid cgroups".to_string()),
        (
            "apple-vz".to_string(),
            "apple-vz: no implementation yet".to_string(),
        ),
    ]
    .into();
    let r = complete(ran.clone(), &listed, &unusable, true);
    let by = |id: &str| r.iter().find(|x| x.id == id).cloned();
    assert_eq!(by("host::exit::code_1").unwrap().outcome, Outcome::Fail);
    assert!(by("host::exit::code_2").is_none(), "another shard's trial");
    assert_eq!(by("host::snapshot::x").unwrap().outcome, Outcome::Skip);
    assert!(
        by("host::snapshot::filtered").is_none(),
        "left out by the filter"
    );
    assert!(by("crun::exit::code_0")
        .unwrap()
        .reason
        .contains("hybrid cgroups"));
    assert!(by("apple-vz::backend::available")
        .unwrap()
        .reason
        .contains("no implementation"));
    // Later shards do not repeat the skips the first shard reports.
    let r = complete(ran, &listed, &unusable, false);
    assert_eq!(r.len(), 2);
}
