//! Reading Kubernetes manifests (YAML streams or JSON) into [`AnyObject`]s.
//!
//! Each document is read once into a `serde_json::Value` (syntax errors carry their line),
//! dispatched on `apiVersion`/`kind`, then decoded into its typed form. Only when decoding
//! fails is the document read again, straight into the typed form, so that the error can
//! name the line and field path.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::Value;
use tracing::debug;

use crate::cilium::CiliumNetworkPolicy;
use crate::objects::{AnyObject, DEFAULT_NAMESPACE, ObjectKind, Problem};

/// How a manifest file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// A YAML stream of one or more `---`-separated documents.
    Yaml,
    /// One JSON value.
    Json,
}

impl ManifestFormat {
    /// The format of a file by its extension: `.yaml`/`.yml` or `.json`; `None` for others.
    pub fn for_path(path: &Path) -> Option<ManifestFormat> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(ManifestFormat::Yaml),
            "json" => Some(ManifestFormat::Json),
            _ => None,
        }
    }
}

/// Reads every object of the kinds this crate knows from one manifest text.
///
/// `source` names the text in problems (a file path). Documents of other kinds are skipped
/// (logged at debug level). `List` documents (and `*List` kinds with `items`) contribute
/// their items. Namespaced objects without a namespace are put in `default`.
///
/// All or nothing: if any document is wrong (bad syntax, a known kind that does not decode,
/// a document that is not an object, an object without a name), the result is every
/// problem found and no object, so that a caller can keep the previous good version.
pub fn parse_manifests(
    source: &str,
    text: &str,
    format: ManifestFormat,
) -> Result<Vec<AnyObject>, Vec<Problem>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parser = Parser {
        source,
        text,
        format,
        objects: Vec::new(),
        problems: Vec::new(),
    };
    match format {
        ManifestFormat::Yaml => {
            for (doc, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
                match Value::deserialize(document) {
                    Ok(value) => parser.value(value, At { doc, item: None }),
                    Err(err) => {
                        // A syntax error ends the stream: later documents cannot be trusted.
                        parser.problem(yaml_line(&err), None, err.to_string());
                        break;
                    }
                }
            }
        }
        ManifestFormat::Json => match serde_json::from_str::<Value>(text) {
            Ok(value) => parser.value(value, At { doc: 0, item: None }),
            Err(err) => parser.problem(json_line(&err), None, err.to_string()),
        },
    }
    if parser.problems.is_empty() {
        Ok(parser.objects)
    } else {
        Err(parser.problems)
    }
}

/// Where a value is: the document index in the stream, and the index in its `items` if it
/// came from a list.
#[derive(Debug, Clone, Copy)]
struct At {
    doc: usize,
    item: Option<usize>,
}

struct Parser<'a> {
    source: &'a str,
    text: &'a str,
    format: ManifestFormat,
    objects: Vec<AnyObject>,
    problems: Vec<Problem>,
}

impl Parser<'_> {
    fn problem(&mut self, line: Option<usize>, object: Option<String>, message: String) {
        self.problems.push(Problem {
            source: self.source.to_owned(),
            line,
            object,
            message,
        });
    }

    fn value(&mut self, value: Value, at: At) {
        let map = match value {
            Value::Null => return, // an empty document
            Value::Object(map) => map,
            other => {
                let found = match other {
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    _ => "a sequence",
                };
                let line = self.start_line(at);
                self.problem(
                    line,
                    None,
                    format!(
                        "expected a Kubernetes object (a mapping with apiVersion and kind), found {found}"
                    ),
                );
                return;
            }
        };
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let kind = map.get("kind").and_then(Value::as_str).map(str::to_owned);
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            let line = self.start_line(at);
            self.problem(
                line,
                None,
                "not a Kubernetes object: apiVersion and kind must both be set".to_owned(),
            );
            return;
        };
        let mut map = map;
        if at.item.is_none() && kind.ends_with("List") {
            match map.remove("items") {
                Some(Value::Array(items)) => {
                    for (index, item) in items.into_iter().enumerate() {
                        self.value(
                            item,
                            At {
                                doc: at.doc,
                                item: Some(index),
                            },
                        );
                    }
                    return;
                }
                None | Some(Value::Null) if kind == "List" => return, // an empty list
                Some(_) if kind == "List" => {
                    let line = self.start_line(at);
                    self.problem(line, None, "List: items must be a sequence".to_owned());
                    return;
                }
                // Some other kind whose name ends in List: put items back.
                Some(items) => {
                    map.insert("items".to_owned(), items);
                }
                None => {}
            }
        }
        let Some(kind) = ObjectKind::from_type(&api_version, &kind) else {
            debug!(source = self.source, %api_version, %kind, "ignoring an object of a kind not read here");
            return;
        };
        self.decode(kind, Value::Object(map), at);
    }

    fn decode(&mut self, kind: ObjectKind, value: Value, at: At) {
        let described = describe(kind, &value);
        let decoded = match kind {
            ObjectKind::Namespace => {
                serde_json::from_value(value).map(|o| AnyObject::Namespace(Arc::new(o)))
            }
            ObjectKind::Node => serde_json::from_value(value).map(|o| AnyObject::Node(Arc::new(o))),
            ObjectKind::Service => {
                serde_json::from_value(value).map(|o| AnyObject::Service(Arc::new(o)))
            }
            ObjectKind::EndpointSlice => {
                serde_json::from_value(value).map(|o| AnyObject::EndpointSlice(Arc::new(o)))
            }
            ObjectKind::Pod => serde_json::from_value(value).map(|o| AnyObject::Pod(Arc::new(o))),
            ObjectKind::NetworkPolicy => {
                serde_json::from_value(value).map(|o| AnyObject::NetworkPolicy(Arc::new(o)))
            }
            ObjectKind::CiliumNetworkPolicy => {
                serde_json::from_value(value).map(|o| AnyObject::CiliumNetworkPolicy(Arc::new(o)))
            }
        };
        let mut object = match decoded {
            Ok(object) => object,
            Err(err) => {
                let (line, message) = match self.locate_decode_error(kind, at) {
                    Some(located) => located,
                    None => (self.start_line(at), err.to_string()),
                };
                self.problem(line, described, message);
                return;
            }
        };
        let meta = object.metadata_mut();
        if meta.name.as_deref().is_none_or(str::is_empty) {
            let line = self.start_line(at);
            self.problem(
                line,
                Some(kind.to_string()),
                "metadata.name is missing".to_owned(),
            );
            return;
        }
        if !kind.namespaced() {
            meta.namespace = None; // as the API server does for cluster-scoped kinds
        } else if meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
        }
        self.objects.push(object);
    }

    /// The line where the value at `at` starts.
    fn start_line(&self, at: At) -> Option<usize> {
        self.locate(at, Probe).and_then(|(line, _)| line)
    }

    /// Reads the value at `at` again as the typed form of `kind`, for an error with a line.
    fn locate_decode_error(&self, kind: ObjectKind, at: At) -> Option<(Option<usize>, String)> {
        use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        use k8s_openapi::api::networking::v1::NetworkPolicy;
        match kind {
            ObjectKind::Namespace => self.locate(at, Typed::<Namespace>(PhantomData)),
            ObjectKind::Node => self.locate(at, Typed::<Node>(PhantomData)),
            ObjectKind::Service => self.locate(at, Typed::<Service>(PhantomData)),
            ObjectKind::EndpointSlice => self.locate(at, Typed::<EndpointSlice>(PhantomData)),
            ObjectKind::Pod => self.locate(at, Typed::<Pod>(PhantomData)),
            ObjectKind::NetworkPolicy => self.locate(at, Typed::<NetworkPolicy>(PhantomData)),
            ObjectKind::CiliumNetworkPolicy => {
                self.locate(at, Typed::<CiliumNetworkPolicy>(PhantomData))
            }
        }
    }

    /// Deserializes the value at `at` with `seed`, returning the line and text of the error.
    fn locate<S>(&self, at: At, seed: S) -> Option<(Option<usize>, String)>
    where
        S: for<'de> DeserializeSeed<'de, Value = ()>,
    {
        let target = Target {
            item: at.item,
            inner: seed,
        };
        match self.format {
            ManifestFormat::Yaml => {
                let document = serde_yaml_ng::Deserializer::from_str(self.text).nth(at.doc)?;
                target
                    .deserialize(document)
                    .err()
                    .map(|err| (yaml_line(&err), err.to_string()))
            }
            ManifestFormat::Json => {
                let mut deserializer = serde_json::Deserializer::from_str(self.text);
                target
                    .deserialize(&mut deserializer)
                    .err()
                    .map(|err| (json_line(&err), err.to_string()))
            }
        }
    }
}

/// `Service ns/name` from a raw value, if it has a name.
fn describe(kind: ObjectKind, value: &Value) -> Option<String> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    if kind.namespaced() {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        Some(format!("{kind} {ns}/{name}"))
    } else {
        Some(format!("{kind} {name}"))
    }
}

fn yaml_line(err: &serde_yaml_ng::Error) -> Option<usize> {
    err.location().map(|l| l.line())
}

fn json_line(err: &serde_json::Error) -> Option<usize> {
    Some(err.line()).filter(|&line| line > 0)
}

/// Navigates to `items[item]` when `item` is set, then applies `inner`.
struct Target<S> {
    item: Option<usize>,
    inner: S,
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> DeserializeSeed<'de> for Target<S> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        match self.item {
            None => self.inner.deserialize(deserializer),
            Some(index) => deserializer.deserialize_map(ItemsField {
                index,
                inner: self.inner,
            }),
        }
    }
}

struct ItemsField<S> {
    index: usize,
    inner: S,
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> Visitor<'de> for ItemsField<S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut inner = Some(NthElement {
            index: self.index,
            inner: self.inner,
        });
        while let Some(key) = map.next_key::<String>()? {
            match (key == "items").then(|| inner.take()).flatten() {
                Some(seed) => map.next_value_seed(seed)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct NthElement<S> {
    index: usize,
    inner: S,
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> DeserializeSeed<'de> for NthElement<S> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> Visitor<'de> for NthElement<S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for _ in 0..self.index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(self.inner)?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// Decodes a `T` and drops it: only its error matters.
struct Typed<T>(PhantomData<T>);

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Typed<T> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        T::deserialize(deserializer).map(drop)
    }
}

/// Fails at once on whatever value it meets, so that the error carries that value's position.
struct Probe;

const PROBE: &str = "probe";

impl<'de> DeserializeSeed<'de> for Probe {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(de::Error::custom(PROBE))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<(), A::Error> {
        Err(de::Error::custom(PROBE))
    }

    fn visit_str<E: de::Error>(self, _v: &str) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_i64<E: de::Error>(self, _v: i64) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_u64<E: de::Error>(self, _v: u64) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(PROBE))
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(PROBE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        parse_manifests("f.yaml", text, ManifestFormat::Yaml).expect_err("should fail")
    }

    #[test]
    fn typed_error_names_line_and_path() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: eighty\n";
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].line, Some(12), "{p:?}");
        assert_eq!(p[0].object.as_deref(), Some("Service default/web"));
        assert!(p[0].message.contains("spec.ports[0].port"), "{p:?}");
    }

    #[test]
    fn syntax_error_has_line() {
        let p = problems("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [a\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].line.is_some(), "{p:?}");
    }

    #[test]
    fn list_item_error_has_line() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata:\n    name: a\n\
                    - apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p\n  spec:\n    containers: 3\n";
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].line, Some(13), "{p:?}");
        assert_eq!(p[0].object.as_deref(), Some("Pod default/p"));
    }

    #[test]
    fn missing_name_and_kind_point_at_the_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\n# c\napiVersion: v1\nkind: Pod\nmetadata: {}\n---\nfoo: bar\n";
        let p = problems(text);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].line, Some(7), "{p:?}");
        assert_eq!(p[1].line, Some(11), "{p:?}");
    }

    #[test]
    fn json_and_defaults() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"s"}},
            {"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"}}]}"#;
        let objects = parse_manifests("f.json", text, ManifestFormat::Json).expect("parses");
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].metadata().namespace.as_deref(), Some("default"));

        let bad = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"s"},
             "spec":{"ports":[{"port":"x"}]}}]}"#;
        let p = parse_manifests("f.json", bad, ManifestFormat::Json).expect_err("fails");
        assert_eq!(p[0].line, Some(3), "{p:?}");
    }

    #[test]
    fn empty_documents_and_comments_are_nothing() {
        let objects = parse_manifests("f.yaml", "# nothing\n---\n---\n", ManifestFormat::Yaml)
            .expect("parses");
        assert!(objects.is_empty());
    }
}
