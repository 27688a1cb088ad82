//! The lifecycle event stream: `/1.0/events?type=lifecycle`, a websocket of JSON
//! messages (`image-created`, `image-deleted`, `instance-started`, ...).

use std::collections::VecDeque;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::{IncusClient, IncusError};

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// What happened: "image-created", "image-deleted", ...
    pub action: String,
    /// The object's API path: "/1.0/images/<fingerprint>", ...
    pub source: String,
    /// The project ("default" when not said).
    pub project: String,
    /// The event's context (for images: `{"type": "virtual-machine"}`).
    pub context: Value,
}

impl LifecycleEvent {
    /// The image fingerprint of an image event (not of an alias event).
    pub fn image_fingerprint(&self) -> Option<&str> {
        self.source
            .strip_prefix("/1.0/images/")
            .filter(|s| !s.is_empty() && !s.contains('/'))
    }

    /// Whether the event says its image is a virtual-machine image.
    pub fn is_vm_image(&self) -> bool {
        self.context["type"].as_str() == Some("virtual-machine")
    }
}

#[derive(Debug, Deserialize)]
struct Raw {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    project: String,
    #[serde(default)]
    metadata: RawMeta,
}

#[derive(Debug, Default, Deserialize)]
struct RawMeta {
    #[serde(default)]
    action: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    context: Value,
}

/// Parses one message of the stream; None for anything but a lifecycle event.
pub(crate) fn parse(text: &str) -> Option<LifecycleEvent> {
    let raw: Raw = serde_json::from_str(text).ok()?;
    if raw.kind != "lifecycle" || raw.metadata.action.is_empty() {
        return None;
    }
    Some(LifecycleEvent {
        action: raw.metadata.action,
        source: raw.metadata.source,
        project: if raw.project.is_empty() {
            "default".into()
        } else {
            raw.project
        },
        context: raw.metadata.context,
    })
}

/// A connected lifecycle event stream.
pub struct LifecycleEvents {
    ws: WebSocketStream<tokio::net::UnixStream>,
    queued: VecDeque<LifecycleEvent>,
}

impl std::fmt::Debug for LifecycleEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LifecycleEvents").finish_non_exhaustive()
    }
}

impl LifecycleEvents {
    /// The next lifecycle event; `Ok(None)` when the daemon closed the stream.
    pub async fn next(&mut self) -> Result<Option<LifecycleEvent>, IncusError> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Ok(Some(e));
            }
            let Some(msg) = self.ws.next().await else {
                return Ok(None);
            };
            match msg.map_err(|e| IncusError::Events(e.to_string()))? {
                Message::Text(t) => self.queued.extend(parse(t.as_str())),
                Message::Binary(b) => self
                    .queued
                    .extend(std::str::from_utf8(&b).ok().and_then(parse)),
                Message::Close(_) => return Ok(None),
                _ => {}
            }
        }
    }
}

impl IncusClient {
    /// Subscribes to lifecycle events (of every project).
    pub async fn lifecycle_events(&self) -> Result<LifecycleEvents, IncusError> {
        let stream = self.connect().await?;
        let url = "ws://localhost/1.0/events?type=lifecycle&all-projects=true";
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .map_err(|e| IncusError::Events(format!("subscribing to {url}: {e}")))?;
        Ok(LifecycleEvents {
            ws,
            queued: VecDeque::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_events_name_their_fingerprint_and_type() {
        // As LXD 5.0.2 sends them.
        let created = r#"{"location":"none","metadata":{"action":"image-created","context":{"type":"virtual-machine"},"requestor":{"address":"@","protocol":"unix","username":"root"},"source":"/1.0/images/2d09b6f824dab2613ca5be9db834570980ee9205a70998a440f7f3035be9882d"},"project":"default","timestamp":"2026-12-06T04:43:13.357383239Z","type":"lifecycle"}"#;
        let e = parse(created).unwrap();
        assert_eq!(e.action, "image-created");
        assert!(e.is_vm_image());
        assert_eq!(
            e.image_fingerprint(),
            Some("2d09b6f824dab2613ca5be9db834570980ee9205a70998a440f7f3035be9882d")
        );
        let alias = r#"{"metadata":{"action":"image-alias-created","context":{"target":"2d09"},"source":"/1.0/images/aliases/t2"},"project":"default","type":"lifecycle"}"#;
        assert_eq!(parse(alias).unwrap().image_fingerprint(), None);
        let deleted = r#"{"metadata":{"action":"image-deleted","source":"/1.0/images/2d09"},"type":"lifecycle"}"#;
        let d = parse(deleted).unwrap();
        assert_eq!(
            (d.action.as_str(), d.project.as_str()),
            ("image-deleted", "default")
        );
        assert!(!d.is_vm_image());
        assert_eq!(parse(r#"{"type":"logging","metadata":{}}"#), None);
        assert_eq!(parse("not json"), None);
    }
}
