//! Builders for the translation's tests: k8s-openapi objects from JSON literals.

use std::sync::Arc;

use cluster_source::{AnyObject, ClusterObjects};
use model::{Capabilities, ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters};
use serde_json::Value;

use super::{Facts, TranslateConfig, translate};
use crate::identity::IdentityAllocator;

pub(crate) fn cluster(name: &str, id: u16) -> ClusterConfig {
    ClusterConfig::new(
        ClusterName::new(name).unwrap(),
        ClusterId::try_from(id).unwrap(),
        MaxConnectedClusters::Max255,
        Capabilities::default(),
    )
    .unwrap()
}

/// Cluster `eu-1`, id 2, every namespace global by default.
pub(crate) fn config() -> TranslateConfig {
    TranslateConfig::new(cluster("eu-1", 2))
}

/// A synced snapshot of `docs`, each a k8s object with `kind` set.
pub(crate) fn objects(docs: Vec<Value>) -> ClusterObjects {
    let mut objects = ClusterObjects {
        synced: true,
        ..Default::default()
    };
    for doc in docs {
        let kind = doc["kind"].as_str().expect("kind").to_owned();
        let object = match kind.as_str() {
            "Namespace" => AnyObject::Namespace(Arc::new(serde_json::from_value(doc).unwrap())),
            "Node" => AnyObject::Node(Arc::new(serde_json::from_value(doc).unwrap())),
            "Service" => AnyObject::Service(Arc::new(serde_json::from_value(doc).unwrap())),
            "EndpointSlice" => {
                AnyObject::EndpointSlice(Arc::new(serde_json::from_value(doc).unwrap()))
            }
            "Pod" => AnyObject::Pod(Arc::new(serde_json::from_value(doc).unwrap())),
            other => panic!("no builder for kind {other}"),
        };
        assert!(objects.insert(object).is_none(), "object given twice");
    }
    objects
}

/// Translates with a fresh allocator.
pub(crate) fn translate_all(objects: &ClusterObjects, config: &TranslateConfig) -> Facts {
    let mut allocator = IdentityAllocator::new(&config.cluster).unwrap();
    translate(objects, config, &mut allocator)
}
