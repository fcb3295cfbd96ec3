//! The flags that name the cluster a daemon belongs to, shared by every daemon so they are
//! spelled, documented and checked the same way.

use anyhow::Context;
use model::{Capabilities, ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters};

/// `--cluster-name`, `--cluster-id`, `--max-connected-clusters`; flatten into a daemon's
/// arguments with `#[command(flatten)]`.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// This cluster's name (lowercase letters, digits and '-', at most 32 characters).
    #[arg(long)]
    pub cluster_name: String,
    /// This cluster's id: 1..=255, or 1..=511 with --max-connected-clusters 511. Every
    /// cluster of a mesh needs its own.
    #[arg(long)]
    pub cluster_id: u16,
    /// 255 or 511; every cluster of a mesh must use the same value.
    #[arg(long, default_value_t = 255)]
    pub max_connected_clusters: u32,
}

impl ClusterArgs {
    /// The cluster's configuration; an error names the flag that is wrong.
    pub fn config(&self, capabilities: Capabilities) -> anyhow::Result<ClusterConfig> {
        let name = ClusterName::new(self.cluster_name.clone()).context("--cluster-name")?;
        let max = MaxConnectedClusters::from_value(self.max_connected_clusters)
            .context("--max-connected-clusters")?;
        let id = ClusterId::new(self.cluster_id, max).context("--cluster-id")?;
        ClusterConfig::new(name, id, max, capabilities).context("--cluster-id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(name: &str, id: u16, max: u32) -> ClusterArgs {
        ClusterArgs {
            cluster_name: name.to_owned(),
            cluster_id: id,
            max_connected_clusters: max,
        }
    }

    #[test]
    fn errors_name_the_flag() {
        let error =
            |a: ClusterArgs| format!("{:#}", a.config(Capabilities::default()).unwrap_err());
        assert!(error(args("Bad_Name", 1, 255)).starts_with("--cluster-name"));
        assert!(error(args("a", 0, 255)).starts_with("--cluster-id"));
        assert!(error(args("a", 300, 255)).starts_with("--cluster-id"));
        assert!(error(args("a", 1, 300)).starts_with("--max-connected-clusters"));
        let ok = args("a", 300, 511).config(Capabilities::default()).unwrap();
        assert_eq!(u16::from(ok.id), 300);
    }
}
