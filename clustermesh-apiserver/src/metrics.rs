//! Prometheus metrics of the apiserver.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// The apiserver's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Keys written or deleted in the store.
    pub writes: Counter,
    /// Publishing passes that failed on a store error (each is retried).
    pub store_errors: Counter,
    /// Objects currently warned about (bad annotations, unreadable manifests, ...).
    pub warnings: Gauge,
    /// 1 once the full initial state and its canaries are published.
    pub ready: Gauge,
    entries: Family<KindLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("clustermesh_apiserver");
        let writes = Counter::default();
        let store_errors = Counter::default();
        let warnings = Gauge::default();
        let ready = Gauge::default();
        let entries = Family::<KindLabel, Gauge>::default();
        registry.register(
            "store_writes",
            "Keys written or deleted in the store",
            writes.clone(),
        );
        registry.register(
            "store_errors",
            "Publishing passes that failed on a store error",
            store_errors.clone(),
        );
        registry.register(
            "warnings",
            "Objects currently warned about",
            warnings.clone(),
        );
        registry.register(
            "ready",
            "1 once the initial state is published",
            ready.clone(),
        );
        registry.register(
            "published_entries",
            "Entries published, per kind",
            entries.clone(),
        );
        Self {
            registry,
            writes,
            store_errors,
            warnings,
            ready,
            entries,
        }
    }
}

impl Metrics {
    /// The gauge of published entries of one kind.
    pub fn entries(&self, kind: &str) -> Gauge {
        self.entries
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .clone()
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
