//! RBD addresses in the form QEMU and qemu-img take (`block/rbd.c`):
//!
//! ```text
//! rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:conf=PATH][:id=USER][:keyring=PATH][:KEY=VALUE...]
//! ```
//!
//! `conf` names the ceph.conf to read (default: librados' search path), `id` the client
//! (default `admin`); every other `KEY=VALUE` is set on the cluster handle as a librados
//! option (`keyring`, `mon_host`, `rados_osd_op_timeout`, ...). A backslash escapes the
//! next character, so `\:`, `\@`, `\/` and `\\` stand for themselves in any field.

use std::fmt;

/// The prefix that marks an RBD address.
pub const PREFIX: &str = "rbd:";

/// A parsed RBD address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    /// RADOS namespace within the pool ("" for the default one).
    pub namespace: String,
    pub image: String,
    /// Snapshot to open (read-only).
    pub snapshot: Option<String>,
    /// ceph.conf to read, if not librados' default search.
    pub conf: Option<String>,
    /// Client id (the `USER` of `client.USER`); `None`: librados' default, `admin`.
    pub id: Option<String>,
    /// Other librados options, in the order given (`keyring`, `mon_host`, ...).
    pub options: Vec<(String, String)>,
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("not an RBD address (expected {PREFIX}POOL/IMAGE): {0:?}")]
    NotRbd(String),
    #[error("RBD address {0:?} names no image (expected {PREFIX}POOL[/NAMESPACE]/IMAGE)")]
    NoImage(String),
    #[error("RBD address {addr:?}: empty {what}")]
    Empty { addr: String, what: &'static str },
    #[error("RBD address {addr:?}: option {option:?} is not KEY=VALUE")]
    BadOption { addr: String, option: String },
    #[error("RBD address {addr:?}: {what} given twice")]
    Repeated { addr: String, what: String },
    #[error("RBD address {0:?} ends in a lone backslash")]
    TrailingBackslash(String),
}

/// Splits `s` at unescaped `sep`, unescaping the pieces.
fn split_unescaped(s: &str, sep: char, addr: &str) -> Result<Vec<String>, SpecError> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => out.last_mut().expect("never empty").push(n),
                None => return Err(SpecError::TrailingBackslash(addr.to_owned())),
            },
            c if c == sep => out.push(String::new()),
            c => out.last_mut().expect("never empty").push(c),
        }
    }
    Ok(out)
}

/// Splits `s` at the first unescaped `sep`, keeping escapes in both halves.
fn split_first_raw(s: &str, sep: char) -> (&str, Option<&str>) {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            return (&s[..i], Some(&s[i + c.len_utf8()..]));
        }
    }
    (s, None)
}

fn unescape(s: &str, addr: &str) -> Result<String, SpecError> {
    Ok(split_unescaped(s, '\0', addr)?.concat())
}

fn escape(s: &str, out: &mut fmt::Formatter<'_>) -> fmt::Result {
    for c in s.chars() {
        if matches!(c, ':' | '@' | '/' | '\\' | '=') {
            write!(out, "\\")?;
        }
        write!(out, "{c}")?;
    }
    Ok(())
}

impl RbdSpec {
    /// Whether `s` is an RBD address (starts with `rbd:`).
    pub fn is_rbd(s: &str) -> bool {
        s.starts_with(PREFIX)
    }

    /// Parses `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE...]`.
    pub fn parse(addr: &str) -> Result<RbdSpec, SpecError> {
        let rest = addr
            .strip_prefix(PREFIX)
            .ok_or_else(|| SpecError::NotRbd(addr.to_owned()))?;
        let empty = |what| SpecError::Empty {
            addr: addr.to_owned(),
            what,
        };
        let (path, opts) = split_first_raw(rest, ':');
        let (path, snap) = split_first_raw(path, '@');
        let parts = split_unescaped(path, '/', addr)?;
        let (pool, namespace, image) = match parts.as_slice() {
            [pool, image] => (pool.clone(), String::new(), image.clone()),
            [pool, ns, image] => (pool.clone(), ns.clone(), image.clone()),
            [_] => return Err(SpecError::NoImage(addr.to_owned())),
            _ => return Err(SpecError::NoImage(addr.to_owned())),
        };
        if pool.is_empty() {
            return Err(empty("pool"));
        }
        if image.is_empty() {
            return Err(empty("image"));
        }
        if parts.len() == 3 && namespace.is_empty() {
            return Err(empty("namespace"));
        }
        let snapshot = match snap {
            Some(s) => {
                let s = unescape(s, addr)?;
                if s.is_empty() {
                    return Err(empty("snapshot"));
                }
                Some(s)
            }
            None => None,
        };
        let mut spec = RbdSpec {
            pool,
            namespace,
            image,
            snapshot,
            conf: None,
            id: None,
            options: Vec::new(),
        };
        let Some(opts) = opts else {
            return Ok(spec);
        };
        for raw in split_raw_all(opts, ':') {
            let (key, value) = split_first_raw(raw, '=');
            let Some(value) = value else {
                return Err(SpecError::BadOption {
                    addr: addr.to_owned(),
                    option: raw.to_owned(),
                });
            };
            let (key, value) = (unescape(key, addr)?, unescape(value, addr)?);
            if key.is_empty() {
                return Err(SpecError::BadOption {
                    addr: addr.to_owned(),
                    option: raw.to_owned(),
                });
            }
            let repeated = || SpecError::Repeated {
                addr: addr.to_owned(),
                what: key.clone(),
            };
            match key.as_str() {
                "conf" if spec.conf.is_some() => return Err(repeated()),
                "conf" => spec.conf = Some(value),
                "id" if spec.id.is_some() => return Err(repeated()),
                "id" => spec.id = Some(value),
                _ if spec.options.iter().any(|(k, _)| *k == key) => return Err(repeated()),
                _ => spec.options.push((key, value)),
            }
        }
        Ok(spec)
    }

    /// The same address with the snapshot replaced.
    pub fn at_snapshot(&self, snapshot: Option<&str>) -> RbdSpec {
        RbdSpec {
            snapshot: snapshot.map(str::to_owned),
            ..self.clone()
        }
    }

    /// `POOL[/NAMESPACE]/IMAGE[@SNAP]`, for messages.
    pub fn image_path(&self) -> String {
        let mut s = self.pool.clone();
        if !self.namespace.is_empty() {
            s.push('/');
            s.push_str(&self.namespace);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }
}

/// Splits at every unescaped `sep`, keeping escapes.
fn split_raw_all(mut s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    loop {
        match split_first_raw(s, sep) {
            (head, Some(tail)) => {
                out.push(head);
                s = tail;
            }
            (head, None) => {
                out.push(head);
                return out;
            }
        }
    }
}

impl fmt::Display for RbdSpec {
    /// The address back in QEMU's syntax (a round trip of [`RbdSpec::parse`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}")?;
        escape(&self.pool, f)?;
        if !self.namespace.is_empty() {
            write!(f, "/")?;
            escape(&self.namespace, f)?;
        }
        write!(f, "/")?;
        escape(&self.image, f)?;
        if let Some(s) = &self.snapshot {
            write!(f, "@")?;
            escape(s, f)?;
        }
        let named = [("conf", &self.conf), ("id", &self.id)];
        for (k, v) in named {
            if let Some(v) = v {
                write!(f, ":{k}=")?;
                escape(v, f)?;
            }
        }
        for (k, v) in &self.options {
            write!(f, ":")?;
            escape(k, f)?;
            write!(f, "=")?;
            escape(v, f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_image() {
        let s = RbdSpec::parse("rbd:vms/disk0").unwrap();
        assert_eq!((s.pool.as_str(), s.image.as_str()), ("vms", "disk0"));
        assert_eq!(s.namespace, "");
        assert_eq!((s.snapshot, s.conf, s.id), (None, None, None));
        assert!(s.options.is_empty());
    }

    #[test]
    fn namespace_snapshot_and_options() {
        let s = RbdSpec::parse(
            "rbd:vms/tenant1/disk0@base:conf=/tmp/c/ceph.conf:id=vmblk:keyring=/k:mon_host=127.0.0.1\\:3300",
        )
        .unwrap();
        assert_eq!(s.pool, "vms");
        assert_eq!(s.namespace, "tenant1");
        assert_eq!(s.image, "disk0");
        assert_eq!(s.snapshot.as_deref(), Some("base"));
        assert_eq!(s.conf.as_deref(), Some("/tmp/c/ceph.conf"));
        assert_eq!(s.id.as_deref(), Some("vmblk"));
        assert_eq!(
            s.options,
            vec![
                ("keyring".to_owned(), "/k".to_owned()),
                ("mon_host".to_owned(), "127.0.0.1:3300".to_owned())
            ]
        );
        assert_eq!(s.image_path(), "vms/tenant1/disk0@base");
    }

    #[test]
    fn display_round_trips_with_escapes() {
        for addr in [
            "rbd:p/i",
            "rbd:p/ns/i@s",
            "rbd:p/i\\:x@s\\@t:conf=/a\\:b:id=u:keyring=/k",
            "rbd:p\\/q/i",
        ] {
            let s = RbdSpec::parse(addr).unwrap();
            let again = RbdSpec::parse(&s.to_string()).unwrap();
            assert_eq!(s, again, "{addr} -> {s}");
        }
        assert_eq!(RbdSpec::parse("rbd:p\\/q/i").unwrap().pool, "p/q");
    }

    #[test]
    fn bad_addresses_name_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("vms/disk", "not an RBD address"),
            ("rbd:vms", "names no image"),
            ("rbd:/disk", "empty pool"),
            ("rbd:vms/", "empty image"),
            ("rbd:vms//disk", "empty namespace"),
            ("rbd:vms/disk@", "empty snapshot"),
            ("rbd:vms/disk:conf", "is not KEY=VALUE"),
            ("rbd:vms/disk:=x", "is not KEY=VALUE"),
            ("rbd:vms/disk:id=a:id=b", "given twice"),
            ("rbd:vms/disk\\", "lone backslash"),
            ("rbd:a/b/c/d", "names no image"),
        ];
        for (addr, want) in cases {
            let e = RbdSpec::parse(addr).unwrap_err().to_string();
            assert!(e.contains(want), "{addr}: {e}");
        }
    }
}
