//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cluster_source::{ClusterObjects, SnapshotReceiver};

/// Generous: these tests poll for a state, they never assert on timing.
pub const TIMEOUT: Duration = Duration::from_secs(15);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "cluster_source=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Waits until a published snapshot satisfies `pred`, or panics with the last snapshot.
pub async fn wait_for(
    rx: &mut SnapshotReceiver,
    what: &str,
    pred: impl FnMut(&Arc<ClusterObjects>) -> bool,
) -> Arc<ClusterObjects> {
    let result = tokio::time::timeout(TIMEOUT, async {
        rx.wait_for(pred)
            .await
            .map(|snapshot| Arc::clone(&snapshot))
    })
    .await;
    match result {
        Ok(Ok(snapshot)) => snapshot,
        Ok(Err(_)) => panic!("the source stopped while waiting for {what}"),
        Err(_) => panic!(
            "timed out waiting for {what}; last snapshot: {:#?}",
            rx.borrow()
        ),
    }
}
