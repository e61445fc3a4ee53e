//! A VM's state as a tree of named, versioned sections: each device and each part of the VM
//! saves its own, and a destination reads only versions it knows, refusing the rest by name.
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SnapshotError {
    /// state section {id} version {version} is unknown to this host
    Unknown { id: String, version: u16 },
    /// state section {id} is version {theirs}; this host reads version {ours}
    Version { id: String, theirs: u16, ours: u16 },
    /// state section {0} is missing
    Missing(String),
    /// state section {id}: {source}
    Json {
        id: String,
        source: serde_json::Error,
    },
}

/// A section's name and version, as a source announces what it will send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionId {
    pub id: String,
    pub version: u16,
}

impl SectionId {
    pub fn new(id: impl Into<String>, version: u16) -> Self {
        SectionId {
            id: id.into(),
            version,
        }
    }
}

/// One section: its own state (JSON) and the sections under it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub version: u16,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub state: serde_json::Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sections: Vec<Snapshot>,
}

impl Snapshot {
    /// A section holding `state`.
    pub fn new<T: Serialize>(
        id: impl Into<String>,
        version: u16,
        state: &T,
    ) -> Result<Self, SnapshotError> {
        let id = id.into();
        let state = serde_json::to_value(state).map_err(|source| SnapshotError::Json {
            id: id.clone(),
            source,
        })?;
        Ok(Snapshot {
            id,
            version,
            state,
            sections: Vec::new(),
        })
    }

    /// A section made only of sections.
    pub fn node(id: impl Into<String>, version: u16, sections: Vec<Snapshot>) -> Self {
        Snapshot {
            id: id.into(),
            version,
            state: serde_json::Value::Null,
            sections,
        }
    }

    /// This section's name and version.
    pub fn section_id(&self) -> SectionId {
        SectionId::new(self.id.clone(), self.version)
    }

    /// The names and versions of the sections directly under this one.
    pub fn manifest(&self) -> Vec<SectionId> {
        self.sections.iter().map(Snapshot::section_id).collect()
    }

    /// The section `id` directly under this one.
    pub fn section(&self, id: &str) -> Result<&Snapshot, SnapshotError> {
        self.sections
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| SnapshotError::Missing(format!("{}/{id}", self.id)))
    }

    /// This section's state, if it is the version the reader knows.
    pub fn state<T: DeserializeOwned>(&self, version: u16) -> Result<T, SnapshotError> {
        if self.version != version {
            return Err(SnapshotError::Version {
                id: self.id.clone(),
                theirs: self.version,
                ours: version,
            });
        }
        T::deserialize(&self.state).map_err(|source| SnapshotError::Json {
            id: self.id.clone(),
            source,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, SnapshotError> {
        serde_json::from_slice(b).map_err(|source| SnapshotError::Json {
            id: "(root)".into(),
            source,
        })
    }
}

/// Every offered section must be one this host knows, at the version it reads.
pub fn check_sections(known: &[SectionId], offered: &[SectionId]) -> Result<(), SnapshotError> {
    for o in offered {
        match known.iter().find(|k| k.id == o.id) {
            None => {
                return Err(SnapshotError::Unknown {
                    id: o.id.clone(),
                    version: o.version,
                })
            }
            Some(k) if k.version != o.version => {
                return Err(SnapshotError::Version {
                    id: o.id.clone(),
                    theirs: o.version,
                    ours: k.version,
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip_and_are_read_at_their_version() {
        let vm = Snapshot::node(
            "vm",
            1,
            vec![
                Snapshot::new("clock", 1, &42u64).unwrap(),
                Snapshot::new("uart", 2, &vec![1u8, 2]).unwrap(),
            ],
        );
        let back = Snapshot::from_bytes(&vm.to_bytes()).unwrap();
        assert_eq!(back, vm);
        assert_eq!(back.section("clock").unwrap().state::<u64>(1).unwrap(), 42);
        let e = back
            .section("uart")
            .unwrap()
            .state::<Vec<u8>>(1)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "state section uart is version 2; this host reads version 1"
        );
        let e = back.section("disk").unwrap_err();
        assert_eq!(e.to_string(), "state section vm/disk is missing");
    }

    #[test]
    fn an_unknown_section_or_version_is_refused_by_name() {
        let known = [SectionId::new("clock", 1), SectionId::new("uart", 1)];
        assert!(check_sections(&known, &[SectionId::new("uart", 1)]).is_ok());
        let e = check_sections(&known, &[SectionId::new("virtio-net", 1)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "state section virtio-net version 1 is unknown to this host"
        );
        let e = check_sections(&known, &[SectionId::new("uart", 3)]).unwrap_err();
        assert!(matches!(
            e,
            SnapshotError::Version {
                theirs: 3,
                ours: 1,
                ..
            }
        ));
    }
}
