//! A vmblk disk in an instance's `raw.qemu`: the `-chardev` (the export's vhost-user
//! socket) and `-device` (vhost-user-blk-pci) pair, merged with whatever else the key
//! holds, found again by its chardev id. Incus and LXD split the key like a shell
//! (quotes, backslashes), so that is how it is read and written here.

use std::collections::BTreeMap;

/// Splits `s` into words like a POSIX shell: whitespace separates, single quotes keep
/// everything, double quotes keep all but `\"` and `\\`, a backslash escapes the next
/// character. An unterminated quote runs to the end.
pub fn split(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some(n @ ('"' | '\\')) => cur.push(n),
                            Some(n) => {
                                cur.push('\\');
                                cur.push(n);
                            }
                            None => cur.push('\\'),
                        },
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Joins words so that [`split`] gives them back: words with nothing special stay bare,
/// others are single-quoted.
pub fn join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=,./:+@%".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `key=value` properties of a QEMU option value (`socket,id=x,path=...`).
fn props(v: &str) -> BTreeMap<&str, &str> {
    v.split(',').filter_map(|p| p.split_once('=')).collect()
}

/// Whether the option `-opt value` at `words[i]` belongs to the disk whose chardev id
/// is `id`.
fn is_ours(words: &[String], i: usize, id: &str) -> bool {
    let Some(value) = words.get(i + 1) else {
        return false;
    };
    match words[i].as_str() {
        "-chardev" => props(value).get("id") == Some(&id),
        "-device" => props(value).get("chardev") == Some(&id),
        _ => false,
    }
}

/// `raw` without the disk whose chardev id is `id` (its `-chardev` and `-device`).
pub fn remove_disk(raw: &str, id: &str) -> String {
    let words = split(raw);
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if is_ours(&words, i, id) {
            i += 2;
            continue;
        }
        out.push(words[i].clone());
        i += 1;
    }
    join(&out)
}

/// `raw` with the disk whose chardev id is `id` set to `-chardev chardev -device
/// device` (replacing an earlier one of the same id, the rest left as it is).
pub fn merge_disk(raw: &str, id: &str, chardev: &str, device: &str) -> String {
    let mut words = split(&remove_disk(raw, id));
    words.extend(
        ["-chardev", chardev, "-device", device]
            .iter()
            .map(|s| s.to_string()),
    );
    join(&words)
}

/// Whether `raw` holds the disk whose chardev id is `id`.
pub fn has_disk(raw: &str, id: &str) -> bool {
    let words = split(raw);
    (0..words.len()).any(|i| is_ours(&words, i, id))
}

/// The boot index that follows every device the daemon numbers itself: Incus and LXD
/// give each disk and NIC of the instance a boot index from 0 (by `boot.priority`, the
/// root disk first among equals) and boot strictly in that order, so an index past
/// them all is free and comes after them.
pub fn next_boot_index(expanded_devices: &BTreeMap<String, BTreeMap<String, String>>) -> usize {
    expanded_devices
        .values()
        .filter(|d| matches!(d.get("type").map(String::as_str), Some("disk" | "nic")))
        .count()
}

/// The chardev id vmblk uses for a volume: `vmblk-` and the first 8 digits of its UUID.
pub fn disk_id(uuid: &str) -> String {
    format!("vmblk-{}", uuid.get(..8).unwrap_or(uuid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_follows_the_shell() {
        assert_eq!(split("  -cpu max  -m 1G "), ["-cpu", "max", "-m", "1G"]);
        assert_eq!(
            split(r#"-a 'b c' "d \" e" f\ g"#),
            ["-a", "b c", "d \" e", "f g"]
        );
        assert_eq!(split(""), Vec::<String>::new());
        assert_eq!(split("''"), [""]);
    }

    #[test]
    fn joining_then_splitting_gives_the_words_back() {
        let words: Vec<String> = ["-x", "a b", "it's", "", "path=/run/x.sock,reconnect=1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(split(&join(&words)), words);
    }

    const CHARDEV: &str = "socket,id=vmblk-1234abcd,path=/run/vmblk/exports/1234.sock,reconnect=1";
    const DEVICE: &str =
        "vhost-user-blk-pci,chardev=vmblk-1234abcd,id=vmblk-1234abcd-disk,bootindex=1";

    #[test]
    fn a_disk_merges_with_what_is_there_and_again_idempotently() {
        let raw = "-cpu max";
        let once = merge_disk(raw, "vmblk-1234abcd", CHARDEV, DEVICE);
        assert_eq!(
            split(&once),
            ["-cpu", "max", "-chardev", CHARDEV, "-device", DEVICE]
        );
        assert!(has_disk(&once, "vmblk-1234abcd"));
        assert_eq!(merge_disk(&once, "vmblk-1234abcd", CHARDEV, DEVICE), once);
        // Another disk is left alone.
        let two = merge_disk(
            &once,
            "vmblk-ffff0000",
            "socket,id=vmblk-ffff0000,path=/x",
            "vhost-user-blk-pci,chardev=vmblk-ffff0000",
        );
        assert!(has_disk(&two, "vmblk-1234abcd") && has_disk(&two, "vmblk-ffff0000"));
        assert_eq!(split(&remove_disk(&two, "vmblk-ffff0000")), split(&once));
        assert_eq!(remove_disk(&once, "vmblk-1234abcd"), "-cpu max");
        assert!(!has_disk(raw, "vmblk-1234abcd"));
    }

    #[test]
    fn the_boot_index_follows_every_disk_and_nic() {
        let mut devs = BTreeMap::new();
        for (name, kind) in [
            ("root", "disk"),
            ("eth0", "nic"),
            ("gpu", "gpu"),
            ("data", "disk"),
        ] {
            devs.insert(
                name.to_string(),
                BTreeMap::from([("type".to_string(), kind.to_string())]),
            );
        }
        assert_eq!(next_boot_index(&devs), 3);
        assert_eq!(next_boot_index(&BTreeMap::new()), 0);
    }
}
