//! What the guest printed: `VMBLK-BOOT`, `VMBLK-CHECK`, `VMBLK-DONE` lines from the
//! serial log, parsed into one [`BootReport`] per boot.

use anyhow::{bail, Result};

/// One `VMBLK-CHECK name=.. ok=.. value=..` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Check name, e.g. `logical_block_size` or `sha256:vmblk/files/hello.txt`.
    pub name: String,
    /// Whether the guest judged it passed.
    pub ok: bool,
    /// Measured value (`-` when empty; spaces became commas).
    pub value: String,
}

impl Check {
    /// Parses one line; `None` if it is not a check line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line[line.find("VMBLK-CHECK ")?..].strip_prefix("VMBLK-CHECK ")?;
        let rest = rest.trim_end();
        let name = rest.strip_prefix("name=")?;
        let (name, rest) = name.split_once(" ok=")?;
        let (ok, value) = rest.split_once(" value=")?;
        Some(Self {
            name: name.to_owned(),
            ok: ok == "1",
            value: value.to_owned(),
        })
    }
}

/// The checks of one boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootReport {
    /// Boot number the guest counted (1 for the first boot of the volume).
    pub boot: u32,
    /// Checks in the order printed.
    pub checks: Vec<Check>,
    /// `pass` and `fail` from `VMBLK-DONE`, if it was printed.
    pub done: Option<(u32, u32)>,
}

impl BootReport {
    /// The check called `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The value of check `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.check(name).map(|c| c.value.as_str())
    }

    /// Checks that failed.
    pub fn failed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    /// Fails unless `VMBLK-DONE` was printed and every check passed.
    pub fn ensure_passed(&self) -> Result<()> {
        let Some((pass, fail)) = self.done else {
            bail!("boot {}: no VMBLK-DONE line", self.boot);
        };
        if fail != 0 || !self.failed().is_empty() {
            bail!(
                "boot {}: {fail} check(s) failed: {:?}",
                self.boot,
                self.failed()
            );
        }
        if self.checks.is_empty() {
            bail!("boot {}: no checks reported", self.boot);
        }
        if pass as usize != self.checks.len() {
            bail!(
                "boot {}: VMBLK-DONE says {pass} passed, {} check lines seen",
                self.boot,
                self.checks.len()
            );
        }
        Ok(())
    }
}

/// Everything the guest reported during one QEMU run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// One entry per `VMBLK-BOOT` line.
    pub boots: Vec<BootReport>,
}

impl GuestReport {
    /// Parses a serial log.
    pub fn parse(log: &str) -> Self {
        let mut boots: Vec<BootReport> = Vec::new();
        for line in log.lines() {
            if let Some(i) = line.find("VMBLK-BOOT n=") {
                let n = line[i + 13..].trim().parse().unwrap_or(0);
                boots.push(BootReport {
                    boot: n,
                    ..Default::default()
                });
            } else if let Some(c) = Check::parse(line) {
                if boots.is_empty() {
                    boots.push(BootReport::default());
                }
                if let Some(b) = boots.last_mut() {
                    b.checks.push(c);
                }
            } else if let Some(i) = line.find("VMBLK-DONE ") {
                let mut pass = None;
                let mut fail = None;
                for kv in line[i + 11..].split_whitespace() {
                    match kv.split_once('=') {
                        Some(("pass", v)) => pass = v.parse().ok(),
                        Some(("fail", v)) => fail = v.parse().ok(),
                        _ => {}
                    }
                }
                if boots.is_empty() {
                    boots.push(BootReport::default());
                }
                if let (Some(b), Some(p), Some(f)) = (boots.last_mut(), pass, fail) {
                    b.done = Some((p, f));
                }
            }
        }
        Self { boots }
    }

    /// Number of boots that printed `VMBLK-DONE`.
    pub fn completed_boots(&self) -> usize {
        self.boots.iter().filter(|b| b.done.is_some()).count()
    }

    /// The last boot.
    pub fn last(&self) -> Option<&BootReport> {
        self.boots.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
BdsDxe: loading Boot0001\r
VMBLK-BOOT n=1\r
VMBLK-CHECK name=logical_block_size ok=1 value=512\r
[    3.1] random kernel line\r
VMBLK-CHECK name=partitions ok=1 value=vda:134217728,vda1:41943040\r
VMBLK-CHECK name=fs_pattern ok=0 value=abc\r
VMBLK-DONE pass=2 fail=1 boot=1\r
VMBLK-BOOT n=2\r
VMBLK-CHECK name=logical_block_size ok=1 value=512\r
";

    #[test]
    fn parses_boots_checks_and_done() {
        let r = GuestReport::parse(LOG);
        assert_eq!(r.boots.len(), 2);
        assert_eq!(r.completed_boots(), 1);
        let b = &r.boots[0];
        assert_eq!(b.boot, 1);
        assert_eq!(b.value("logical_block_size"), Some("512"));
        assert_eq!(b.value("partitions"), Some("vda:134217728,vda1:41943040"));
        assert_eq!(b.done, Some((2, 1)));
        assert_eq!(b.failed().len(), 1);
        assert!(b.ensure_passed().is_err());
        assert!(r.boots[1].ensure_passed().is_err());
    }

    #[test]
    fn ignores_other_lines() {
        assert_eq!(Check::parse("VMBLK-CHECK garbage"), None);
        assert_eq!(GuestReport::parse("hello\nworld\n").boots.len(), 0);
    }
}
