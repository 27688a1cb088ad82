//! Instances: read one, create an empty VM, change its config, start and stop it.

use std::collections::BTreeMap;

use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{IncusClient, IncusError};

/// An instance as the API describes it (the fields vmblk uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Instance {
    /// Its name.
    pub name: String,
    /// "Running", "Stopped", ...
    #[serde(default)]
    pub status: String,
    /// "virtual-machine" or "container".
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Its own config.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Config with its profiles applied.
    #[serde(default)]
    pub expanded_config: BTreeMap<String, String>,
    /// Devices with its profiles applied.
    #[serde(default)]
    pub expanded_devices: BTreeMap<String, BTreeMap<String, String>>,
}

impl Instance {
    /// Whether it is a virtual machine.
    pub fn is_vm(&self) -> bool {
        self.kind == "virtual-machine"
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.status.eq_ignore_ascii_case("running")
    }

    /// The expanded value of config key `key` ("" when unset).
    pub fn expanded(&self, key: &str) -> &str {
        self.expanded_config.get(key).map_or("", String::as_str)
    }
}

/// An empty virtual machine to create.
#[derive(Debug, Clone, Default)]
pub struct NewVm {
    /// Its name.
    pub name: String,
    /// Profiles (empty: the daemon's default).
    pub profiles: Vec<String>,
    /// Config keys.
    pub config: BTreeMap<String, String>,
}

fn path(name: &str) -> String {
    format!("/1.0/instances/{name}")
}

impl IncusClient {
    /// The instance `name`.
    pub async fn instance(&self, name: &str) -> Result<Instance, IncusError> {
        self.get(&path(name)).await
    }

    /// Creates an empty virtual machine (no image: its root disk holds nothing).
    pub async fn create_empty_vm(&self, vm: &NewVm) -> Result<(), IncusError> {
        let mut body = json!({
            "name": vm.name,
            "type": "virtual-machine",
            "source": {"type": "none"},
            "config": vm.config,
        });
        if !vm.profiles.is_empty() {
            body["profiles"] = json!(vm.profiles);
        }
        self.send(Method::POST, "/1.0/instances", Some(&body))
            .await
            .map(|_| ())
    }

    /// Sets (`Some`) or removes (`None`) config keys of the instance, leaving the
    /// others as they are.
    pub async fn update_config(
        &self,
        name: &str,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<(), IncusError> {
        // PATCH merges config keys; a removed key is set to "" (unset).
        let config: BTreeMap<&str, Value> = changes
            .iter()
            .map(|(k, v)| (k.as_str(), json!(v.clone().unwrap_or_default())))
            .collect();
        self.send(
            Method::PATCH,
            &path(name),
            Some(&json!({ "config": config })),
        )
        .await
        .map(|_| ())
    }

    /// Starts, stops (`force`: at once) or restarts the instance, and waits.
    pub async fn set_state(&self, name: &str, action: &str, force: bool) -> Result<(), IncusError> {
        let body = json!({"action": action, "timeout": 30, "force": force});
        self.send(Method::PUT, &format!("{}/state", path(name)), Some(&body))
            .await
            .map(|_| ())
    }

    /// Deletes the (stopped) instance.
    pub async fn delete_instance(&self, name: &str) -> Result<(), IncusError> {
        self.send(Method::DELETE, &path(name), None)
            .await
            .map(|_| ())
    }
}
