//! Expert placement: which expert shard(s) hold each routed expert (DESIGN.md §4).
//!
//! The initial table is a pure function of `(n_routed_experts, shards, redundant_slots)`, so every
//! attention pod and every shard computes the same table without talking to each other. Experts
//! are dealt out in contiguous ranges (shard `s` holds experts `[s·E/S, (s+1)·E/S)`, the first
//! `E mod S` shards one more): contiguous ranges keep a shard's weight reads sequential in the
//! checkpoint. Redundant slots then add replicas: the `redundant_slots` of shard `s` hold experts
//! of shard `s + ⌊S/2⌋ (mod S)`, so a replica never lives on its primary's shard and a dead
//! shard's experts can fail over to a live one. Rebalancing (EPLB, [`crate::rebalancer`])
//! publishes later tables with higher versions: built by [`Placement::from_assignments`], sent
//! as [`PlacementTable`]s, and kept in a file ([`KeptTable::write_file`]: the table in force, and
//! during a publication the table it switches from) from which a restarted process starts, so
//! that it comes back on the table in force rather than on version 1.

use shardseek_proto::v1::PlacementTable;

use crate::{Error, Result};

/// An expert → shard(s) table with a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    version: u64,
    shards: usize,
    /// For every expert, the shards holding it; the first is its primary.
    replicas: Vec<Vec<usize>>,
}

impl Placement {
    /// The initial table (version 1): contiguous primaries plus `redundant_slots` replicas per shard.
    pub fn initial(n_experts: usize, shards: usize, redundant_slots: usize) -> Result<Self> {
        if n_experts == 0 || shards == 0 {
            return Err(Error::Placement(format!(
                "{n_experts} experts over {shards} shards: both must be positive"
            )));
        }
        if shards > n_experts {
            return Err(Error::Placement(format!(
                "{shards} shards for {n_experts} experts: some shard would hold nothing"
            )));
        }
        if redundant_slots > 0 && shards < 2 {
            return Err(Error::Placement(
                "redundant expert slots need at least 2 shards".into(),
            ));
        }
        let mut replicas: Vec<Vec<usize>> = (0..n_experts)
            .map(|e| vec![primary_shard(e, n_experts, shards)])
            .collect();
        // Replica slot j of shard s takes the j-th expert (round robin) of shard s + S/2 (mod S),
        // skipping experts that already have a replica on s.
        let offset = (shards / 2).max(1);
        for s in 0..shards {
            let donor = (s + offset) % shards;
            let (lo, hi) = shard_range(donor, n_experts, shards);
            let mut placed = 0;
            let mut k = 0;
            while placed < redundant_slots && k < hi - lo {
                // Spread over the donor's range: start at a rotation that differs per shard.
                let e = lo + (k + s) % (hi - lo);
                if !replicas[e].contains(&s) {
                    replicas[e].push(s);
                    placed += 1;
                }
                k += 1;
            }
        }
        Ok(Placement {
            version: 1,
            shards,
            replicas,
        })
    }

    /// A table given explicitly (e.g. published by a rebalancer), checked for consistency.
    pub fn from_assignments(
        version: u64,
        shards: usize,
        replicas: Vec<Vec<usize>>,
    ) -> Result<Self> {
        for (e, r) in replicas.iter().enumerate() {
            if r.is_empty() {
                return Err(Error::Placement(format!("expert {e} has no shard")));
            }
            if let Some(&bad) = r.iter().find(|&&s| s >= shards) {
                return Err(Error::Placement(format!(
                    "expert {e} placed on shard {bad} of {shards}"
                )));
            }
            if r.iter().enumerate().any(|(i, s)| r[..i].contains(s)) {
                return Err(Error::Placement(format!(
                    "expert {e} placed twice on one shard: {r:?}"
                )));
            }
        }
        Ok(Placement {
            version,
            shards,
            replicas,
        })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn n_experts(&self) -> usize {
        self.replicas.len()
    }

    /// The shards holding `expert`, primary first; `None` for an expert id out of range.
    pub fn replicas(&self, expert: usize) -> Option<&[usize]> {
        self.replicas.get(expert).map(Vec::as_slice)
    }

    /// The experts shard `shard` must load, ascending.
    pub fn experts_of(&self, shard: usize) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&e| self.replicas[e].contains(&shard))
            .collect()
    }

    /// Whether `other` places every expert on the same shards (versions aside).
    pub fn same_table(&self, other: &Placement) -> bool {
        self.shards == other.shards && self.replicas == other.replicas
    }

    /// The table as the placement control plane sends it.
    pub fn to_proto(&self) -> PlacementTable {
        PlacementTable {
            version: self.version,
            shards: self.shards as u32,
            replica_counts: self.replicas.iter().map(|r| r.len() as u32).collect(),
            shard_ids: self.replicas.iter().flatten().map(|&s| s as u32).collect(),
        }
    }

    /// A received table, checked: one count per expert, the ids they announce, shards in range.
    pub fn from_proto(table: &PlacementTable) -> Result<Self> {
        let total: usize = table.replica_counts.iter().map(|&c| c as usize).sum();
        if total != table.shard_ids.len() {
            return Err(Error::Placement(format!(
                "table version {}: replica counts add up to {total}, {} shard ids follow",
                table.version,
                table.shard_ids.len()
            )));
        }
        let mut ids = table.shard_ids.iter().map(|&s| s as usize);
        let replicas = table
            .replica_counts
            .iter()
            .map(|&c| ids.by_ref().take(c as usize).collect())
            .collect();
        Self::from_assignments(table.version, table.shards as usize, replicas)
    }

    /// The table as the JSON text of the placement file (what [`write_file`](Self::write_file)
    /// writes and the operator keeps in a ConfigMap).
    pub fn to_json(&self) -> String {
        let file = PlacementFile {
            version: self.version,
            shards: self.shards,
            replicas: self.replicas.clone(),
            previous: None,
        };
        // A struct of integers and vectors always serialises.
        serde_json::to_string(&file).unwrap_or_default()
    }

    /// A table from the text of a placement file, checked as [`from_assignments`](Self::from_assignments) checks.
    pub fn from_json(text: &str) -> Result<Self> {
        let file: PlacementFile = serde_json::from_str(text)
            .map_err(|e| Error::Placement(format!("not a placement table: {e}")))?;
        Self::from_assignments(file.version, file.shards, file.replicas)
    }

    /// Writes the table to `path` atomically (a temporary file renamed over it), so a process
    /// starting at any moment reads a whole table.
    pub fn write_file(&self, path: &std::path::Path) -> Result<()> {
        write_atomically(path, &self.to_json())
    }

    /// Reads a table written by [`write_file`](Self::write_file); `None` when the file does not
    /// exist (no rebalance has published one yet).
    pub fn read_file(path: &std::path::Path) -> Result<Option<Self>> {
        let Some(file) = read_placement_file(path)? else {
            return Ok(None);
        };
        Self::from_assignments(file.version, file.shards, file.replicas).map(Some)
    }
}

/// The on-disk form of a table (JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct PlacementFile {
    version: u64,
    shards: usize,
    replicas: Vec<Vec<usize>>,
    /// Present while a publication switches from this older table (see [`KeptTable`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<PreviousTable>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PreviousTable {
    version: u64,
    replicas: Vec<Vec<usize>>,
}

/// What a rebalancer keeps for processes that start later (the placement file of `up`, the
/// `NAME-placement` ConfigMap under Kubernetes): the table in force and, while a publication
/// is under way (every shard prepared it, not every pod is known to route with it yet), the
/// table it switches from. A shard that starts then accepts both versions, so neither the pods
/// that switched nor those that have not are refused; a pod starts on the new one. The
/// rebalancer rewrites it without `previous` once every pod routes with the new table and every
/// shard committed it. A process of an older release reads the same file as the table in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptTable {
    pub current: Placement,
    /// The table a publication under way switches from (same shape, older version).
    pub previous: Option<Placement>,
}

impl KeptTable {
    /// A table in force with no publication under way.
    pub fn settled(current: Placement) -> Self {
        KeptTable {
            current,
            previous: None,
        }
    }

    /// The JSON text kept (the table in force in [`Placement::to_json`]'s form, plus
    /// `previous` while switching).
    pub fn to_json(&self) -> String {
        let file = PlacementFile {
            version: self.current.version,
            shards: self.current.shards,
            replicas: self.current.replicas.clone(),
            previous: self.previous.as_ref().map(|p| PreviousTable {
                version: p.version,
                replicas: p.replicas.clone(),
            }),
        };
        serde_json::to_string(&file).unwrap_or_default()
    }

    /// Reads [`to_json`](Self::to_json)'s text (or a plain table's), checking both tables.
    pub fn from_json(text: &str) -> Result<Self> {
        let file: PlacementFile = serde_json::from_str(text)
            .map_err(|e| Error::Placement(format!("not a placement table: {e}")))?;
        Self::from_file(file)
    }

    fn from_file(file: PlacementFile) -> Result<Self> {
        let current = Placement::from_assignments(file.version, file.shards, file.replicas)?;
        let previous = match file.previous {
            None => None,
            Some(p) => {
                let p = Placement::from_assignments(p.version, file.shards, p.replicas)?;
                if p.version >= current.version || p.n_experts() != current.n_experts() {
                    return Err(Error::Placement(format!(
                        "kept table version {}: the previous table (version {}, {} experts) \
                         must be older and of the same shape",
                        current.version,
                        p.version,
                        p.n_experts()
                    )));
                }
                Some(p)
            }
        };
        Ok(KeptTable { current, previous })
    }

    /// Writes the record to `path` atomically, as [`Placement::write_file`] does.
    pub fn write_file(&self, path: &std::path::Path) -> Result<()> {
        write_atomically(path, &self.to_json())
    }

    /// Reads a record written by [`write_file`](Self::write_file) (or [`Placement::write_file`]);
    /// `None` when the file does not exist.
    pub fn read_file(path: &std::path::Path) -> Result<Option<Self>> {
        let Some(file) = read_placement_file(path)? else {
            return Ok(None);
        };
        Self::from_file(file).map(Some)
    }
}

/// Writes `text` to `path` atomically (a temporary file renamed over it), so a process starting
/// at any moment reads a whole file.
fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let io = |source| Error::Io {
        op: format!("writing the placement file {}", path.display()),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The parsed placement file at `path`; `None` when it does not exist.
fn read_placement_file(path: &std::path::Path) -> Result<Option<PlacementFile>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                op: format!("reading the placement file {}", path.display()),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Placement(format!("placement file {}: {e}", path.display())))
}

/// Shard `s`'s contiguous primary range `[lo, hi)`.
fn shard_range(s: usize, n: usize, shards: usize) -> (usize, usize) {
    let base = n / shards;
    let extra = n % shards;
    let lo = s * base + s.min(extra);
    let hi = lo + base + usize::from(s < extra);
    (lo, hi)
}

fn primary_shard(e: usize, n: usize, shards: usize) -> usize {
    let base = n / shards;
    let extra = n % shards;
    // The first `extra` shards hold base + 1 experts each.
    let big = extra * (base + 1);
    if e < big {
        e / (base + 1)
    } else {
        extra + (e - big) / base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_record_keeps_the_table_a_publication_switches_from() {
        let v1 = Placement::initial(8, 2, 1).expect("valid");
        let v2 = Placement::from_assignments(2, 2, (0..8).map(|e| vec![(e + 1) % 2]).collect())
            .expect("valid");
        let under_way = KeptTable {
            current: v2.clone(),
            previous: Some(v1.clone()),
        };
        let text = under_way.to_json();
        assert_eq!(KeptTable::from_json(&text).expect("reads"), under_way);
        // A reader of the table alone (an older release) sees the table in force.
        assert_eq!(Placement::from_json(&text).expect("reads"), v2);
        // A settled record is a plain table, and a plain table is a settled record.
        assert_eq!(KeptTable::settled(v2.clone()).to_json(), v2.to_json());
        assert_eq!(
            KeptTable::from_json(&v1.to_json()).expect("reads"),
            KeptTable::settled(v1.clone())
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("placement.json");
        assert_eq!(KeptTable::read_file(&path).expect("absent"), None);
        under_way.write_file(&path).expect("writes");
        assert_eq!(KeptTable::read_file(&path).expect("reads"), Some(under_way));
        // The previous table must be older and of the same shape.
        let backwards = KeptTable {
            current: v1,
            previous: Some(v2),
        };
        let e = KeptTable::from_json(&backwards.to_json()).expect_err("newer previous");
        assert!(e.to_string().contains("must be older"), "{e}");
    }

    #[test]
    fn initial_is_pure_and_balanced() {
        for (n, s) in [(256, 4), (256, 1), (16, 3), (10, 10), (257, 8)] {
            let a = Placement::initial(n, s, 0).expect("valid");
            assert_eq!(a, Placement::initial(n, s, 0).expect("valid"), "pure");
            let counts: Vec<usize> = (0..s).map(|sh| a.experts_of(sh).len()).collect();
            let (min, max) = (counts.iter().min(), counts.iter().max());
            assert!(
                max.zip(min).is_some_and(|(x, y)| x - y <= 1),
                "{n}/{s}: {counts:?}"
            );
            assert_eq!(counts.iter().sum::<usize>(), n);
            for e in 0..n {
                let (lo, hi) = shard_range(primary_shard(e, n, s), n, s);
                assert!((lo..hi).contains(&e));
            }
        }
    }

    #[test]
    fn redundant_slots_replicate_on_other_shards() {
        let p = Placement::initial(16, 4, 2).expect("valid");
        for s in 0..4 {
            assert_eq!(p.experts_of(s).len(), 4 + 2, "shard {s}");
        }
        for e in 0..16 {
            let r = p.replicas(e).expect("in range");
            let mut d = r.to_vec();
            d.dedup();
            assert_eq!(d.len(), r.len(), "no duplicate replica for expert {e}");
        }
        let replicated = (0..16)
            .filter(|&e| p.replicas(e).is_some_and(|r| r.len() > 1))
            .count();
        assert_eq!(replicated, 8);
        assert!(Placement::initial(16, 1, 1).is_err());
        assert!(Placement::initial(4, 8, 0).is_err());
    }

    #[test]
    fn proto_and_file_round_trip_and_bad_tables_are_refused() {
        let p = Placement::from_assignments(7, 3, vec![vec![2], vec![0, 1], vec![1, 2, 0]])
            .expect("valid");
        let back = Placement::from_proto(&p.to_proto()).expect("round trip");
        assert_eq!(back, p);
        let dir = std::env::temp_dir().join(format!("shardseek-placement-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("placement.json");
        assert_eq!(Placement::read_file(&path).expect("absent is fine"), None);
        p.write_file(&path).expect("write");
        assert_eq!(Placement::read_file(&path).expect("read"), Some(p.clone()));
        std::fs::remove_dir_all(&dir).expect("cleanup");
        let mut bad = p.to_proto();
        bad.shard_ids.pop();
        assert!(Placement::from_proto(&bad).is_err(), "short id list");
        let mut bad = p.to_proto();
        bad.shard_ids[0] = 3;
        assert!(Placement::from_proto(&bad).is_err(), "shard out of range");
        let mut bad = p.to_proto();
        bad.replica_counts[0] = 0;
        bad.shard_ids.remove(0);
        assert!(
            Placement::from_proto(&bad).is_err(),
            "expert without a shard"
        );
    }
}
