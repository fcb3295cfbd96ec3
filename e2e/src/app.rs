//! The workloads scenarios apply, built from parts so each scenario states only what differs:
//! an echo Deployment, Services over it, client pods (all in namespace `shop`).

/// The annotation that makes a Service global.
pub const GLOBAL: &str = "service.cilium.io/global: 'true'";

/// Deployment `name`: `replicas` pods labelled `app: <name>`, each serving TCP 8080 as `http`.
pub fn deployment(name: &str, replicas: usize) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: shop}}
spec:
  replicas: {replicas}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec: {{containers: [{{name: echo, ports: [{{name: http, containerPort: 8080}}]}}]}}
"
    )
}

/// Service `name` over the pods labelled `app: <selector>`, port 80 to their `http`, with
/// `annotations` (the inside of a YAML flow mapping, e.g. [`GLOBAL`]).
pub fn service(name: &str, selector: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: shop
  annotations: {{{annotations}}}
spec:
  selector: {{app: {selector}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"
    )
}

/// Pod `name` labelled `app: <name>`, behind no Service: a client to probe from (the
/// environment still runs its echo server, on the default port).
pub fn client(name: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec: {{containers: [{{name: client}}]}}
"
    )
}

/// The most common workload: `replicas` echo pods behind the global Service `echo`.
pub fn global_echo(replicas: usize) -> String {
    documents(&[
        deployment("echo", replicas),
        service("echo", "echo", GLOBAL),
    ])
}

/// Documents joined into one multi-document YAML text.
pub fn documents(parts: &[String]) -> String {
    parts.join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_make_manifests_the_environment_accepts() {
        let text = documents(&[global_echo(2), client("client")]);
        let applied = mesh_devenv::manifests::parse_apply(&text).unwrap();
        let pods: Vec<(&str, Option<&str>, u16)> = applied
            .pods
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.owner.as_deref(),
                    p.ports.first().map_or(0, |port| port.port),
                )
            })
            .collect();
        assert_eq!(
            pods,
            [
                ("echo-0", Some("echo"), 8080),
                ("echo-1", Some("echo"), 8080),
                ("client", None, 8080)
            ]
        );
        assert_eq!(applied.objects.len(), 1);
        let service = &applied.objects[0];
        assert_eq!(service["kind"], "Service");
        assert_eq!(
            service["metadata"]["annotations"]["service.cilium.io/global"],
            "true"
        );
        assert_eq!(service["spec"]["selector"]["app"], "echo");
    }
}
