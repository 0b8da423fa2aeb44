//! What the guest's console log tells when a boot fails: the panic line and the last line, read
//! from a bounded tail.

use std::fs;
use std::path::Path;

/// The console's last line, and first the line naming a guest kernel panic, oops or BUG when there
/// is one (the last line of a panic is only the end of its stack trace). Reads at most the log's
/// last 64 KiB: the guest writes this file, so its size is not ours to trust.
pub(crate) fn summary(p: &Path) -> String {
    const TAIL: u64 = 64 * 1024;
    let tail = (|| -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(p)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
        let mut b = Vec::new();
        f.take(TAIL).read_to_end(&mut b)?;
        Ok(b)
    })();
    let Ok(bytes) = tail else {
        return "empty".into();
    };
    summarize_console(&String::from_utf8_lossy(&bytes))
}

fn summarize_console(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let last = lines.clone().next_back();
    let fatal =
        lines.find(|l| l.contains("Kernel panic") || l.contains("Oops:") || l.contains("BUG:"));
    match (fatal, last) {
        (Some(f), Some(l)) if f != l => format!("{f} ... {l}"),
        (_, Some(l)) => l.to_string(),
        _ => "empty".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::summarize_console;

    #[test]
    fn a_panic_is_named_before_the_end_of_its_trace() {
        let log = "[    0.02] ..MP-BIOS bug: 8254 timer not connected to IO-APIC\n\
                   [    0.03] Kernel panic - not syncing: IO-APIC + timer doesn't work!\n\
                   [    0.04] Call Trace:\n[    0.06]  </TASK>\n";
        assert_eq!(
            summarize_console(log),
            "[    0.03] Kernel panic - not syncing: IO-APIC + timer doesn't work! ... [    0.06]  </TASK>"
        );
        assert_eq!(summarize_console("a\n\nready\n"), "ready");
        assert_eq!(summarize_console("\n \n"), "empty");
    }
}
