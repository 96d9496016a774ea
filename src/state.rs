//! The live policy snapshot: an `ArcSwap` read lock-free on every request and swapped whole on
//! reload, with a generation number that rises once per successful load. Every policy that
//! comes into force updates the config and policy gauges in [`crate::telemetry::metrics`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{Config, Loaded, SourceFile};
use crate::policy::Policy;
use crate::telemetry::metrics;

/// One loaded configuration and its compiled policy. Requests hold an `Arc<Snapshot>` for
/// their whole life, so in-flight work finishes under the policy it started with.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub policy: Policy,
    pub sources: Vec<SourceFile>,
    pub generation: u64,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    /// Sets the generation, last-success time and policy size gauges to this snapshot's.
    fn publish_metrics(&self) {
        metrics().set_policy(self.generation, self.policy.rules().len(), self.policy.names().len(), self.loaded_at);
    }
}

/// The current snapshot and the generation counter.
#[derive(Debug)]
pub struct State {
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
}

impl State {
    /// Starts at generation 1 with `loaded`.
    pub fn new(loaded: Loaded) -> Self {
        let snap = Snapshot {
            config: loaded.config,
            policy: loaded.policy,
            sources: loaded.sources,
            generation: 1,
            loaded_at: SystemTime::now(),
        };
        snap.publish_metrics();
        Self { current: ArcSwap::from_pointee(snap), generation: AtomicU64::new(1) }
    }

    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Swaps in a newly loaded policy and counts a successful reload; returns its generation.
    pub fn replace(&self, loaded: Loaded) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let snap = Snapshot {
            config: loaded.config,
            policy: loaded.policy,
            sources: loaded.sources,
            generation,
            loaded_at: SystemTime::now(),
        };
        snap.publish_metrics();
        metrics().config_reloads_success.inc();
        self.current.store(Arc::new(snap));
        generation
    }
}
