//! The Service annotations that make a service global, shared and affine.
//!
//! Pure functions over an annotation map, so the apiserver (deciding what to publish) and the
//! agent (deciding where to send) can never read the same Service differently.

use std::collections::BTreeMap;
use std::fmt;

/// `"true"` makes the service global: backends come from every cluster that has it.
pub const GLOBAL: &str = "service.cilium.io/global";
/// Old name of [`GLOBAL`], still accepted.
pub const GLOBAL_ALIAS: &str = "io.cilium/global-service";
/// `"false"` keeps this cluster's backends out of other clusters.
pub const SHARED: &str = "service.cilium.io/shared";
/// Old name of [`SHARED`], still accepted.
pub const SHARED_ALIAS: &str = "io.cilium/shared-service";
/// `local`, `remote` or `none`: which cluster's backends to prefer.
pub const AFFINITY: &str = "service.cilium.io/affinity";
/// Old name of [`AFFINITY`], still accepted.
pub const AFFINITY_ALIAS: &str = "io.cilium/service-affinity";

/// Which backends a global service prefers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Affinity {
    /// No preference: every ready backend alike. Also what `none` means.
    #[default]
    None,
    /// This cluster's backends first; others only when none is ready.
    Local,
    /// Other clusters' backends first; this cluster's only when none is ready.
    Remote,
}

impl Affinity {
    /// The annotation value: `none`, `local` or `remote`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Local => "local",
            Affinity::Remote => "remote",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        [Affinity::None, Affinity::Local, Affinity::Remote]
            .into_iter()
            .find(|a| value.eq_ignore_ascii_case(a.as_str()))
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a Service's annotations ask of the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceMeshOptions {
    /// Merge backends from every cluster that has the service.
    pub global: bool,
    /// Offer this cluster's backends to other clusters; true by default for a global service,
    /// always false for one that is not global.
    pub shared: bool,
    /// Which backends to prefer; always `None` for a service that is not global.
    pub affinity: Affinity,
}

/// An annotation that was not used as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationWarning {
    /// A value outside the annotation's vocabulary; the annotation is treated as absent.
    #[error("annotation {annotation}: value {value:?} is not one of {expected}; ignoring it")]
    InvalidValue {
        /// The annotation's name.
        annotation: &'static str,
        /// The value found.
        value: String,
        /// The values accepted.
        expected: &'static str,
    },
    /// The annotation and its old alias disagree; the annotation wins.
    #[error(
        "annotations {annotation}={value:?} and {alias}={alias_value:?} disagree; \
         using {annotation}"
    )]
    Conflict {
        /// The current name.
        annotation: &'static str,
        /// Its value, the one used.
        value: String,
        /// The old name.
        alias: &'static str,
        /// Its value, ignored.
        alias_value: String,
    },
    /// An annotation that means something only on a global service.
    #[error("annotation {annotation} has no effect: the service is not global")]
    NotGlobal {
        /// The annotation's name (or alias) found.
        annotation: &'static str,
    },
}

const BOOL_VALUES: &str = "\"true\" or \"false\"";
const AFFINITY_VALUES: &str = "\"local\", \"remote\" or \"none\"";

/// `true` or `false`, any case, as Cilium reads its boolean annotations.
pub fn parse_bool(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// One annotation with its alias: the value parsed from whichever applies.
struct Pair<T> {
    annotation: &'static str,
    alias: &'static str,
    expected: &'static str,
    parse: fn(&str) -> Option<T>,
}

impl<T: PartialEq + Copy> Pair<T> {
    /// The parsed value, the name it came from, and warnings for whatever was not used.
    fn read(
        &self,
        annotations: &BTreeMap<String, String>,
        warnings: &mut Vec<AnnotationWarning>,
    ) -> Option<(T, &'static str)> {
        let mut parsed = |name: &'static str| {
            let raw = annotations.get(name)?;
            match (self.parse)(raw) {
                Some(v) => Some((v, raw)),
                None => {
                    warnings.push(AnnotationWarning::InvalidValue {
                        annotation: name,
                        value: raw.clone(),
                        expected: self.expected,
                    });
                    None
                }
            }
        };
        let current = parsed(self.annotation);
        let old = parsed(self.alias);
        match (current, old) {
            (Some((v, raw)), Some((o, old_raw))) => {
                if v != o {
                    warnings.push(AnnotationWarning::Conflict {
                        annotation: self.annotation,
                        value: raw.clone(),
                        alias: self.alias,
                        alias_value: old_raw.clone(),
                    });
                }
                Some((v, self.annotation))
            }
            (Some((v, _)), None) => Some((v, self.annotation)),
            (None, Some((o, _))) => Some((o, self.alias)),
            (None, None) => None,
        }
    }
}

/// Reads the mesh options from a Service's annotations, with a warning for every annotation
/// not used as written. Values are case-insensitive; a bad value counts as absent (so an
/// alias with a good value then applies).
pub fn parse_service_annotations(
    annotations: &BTreeMap<String, String>,
) -> (ServiceMeshOptions, Vec<AnnotationWarning>) {
    let mut warnings = Vec::new();
    let global = Pair {
        annotation: GLOBAL,
        alias: GLOBAL_ALIAS,
        expected: BOOL_VALUES,
        parse: parse_bool,
    }
    .read(annotations, &mut warnings);
    let shared = Pair {
        annotation: SHARED,
        alias: SHARED_ALIAS,
        expected: BOOL_VALUES,
        parse: parse_bool,
    }
    .read(annotations, &mut warnings);
    let affinity = Pair {
        annotation: AFFINITY,
        alias: AFFINITY_ALIAS,
        expected: AFFINITY_VALUES,
        parse: Affinity::parse,
    }
    .read(annotations, &mut warnings);

    let global = global.is_some_and(|(g, _)| g);
    if !global {
        if let Some((_, name)) = shared {
            warnings.push(AnnotationWarning::NotGlobal { annotation: name });
        }
        if let Some((_, name)) = affinity {
            warnings.push(AnnotationWarning::NotGlobal { annotation: name });
        }
        return (ServiceMeshOptions::default(), warnings);
    }
    let options = ServiceMeshOptions {
        global,
        shared: shared.is_none_or(|(s, _)| s),
        affinity: affinity.map_or(Affinity::None, |(a, _)| a),
    };
    (options, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (ServiceMeshOptions, Vec<AnnotationWarning>) {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_service_annotations(&map)
    }

    fn opts(global: bool, shared: bool, affinity: Affinity) -> ServiceMeshOptions {
        ServiceMeshOptions {
            global,
            shared,
            affinity,
        }
    }

    #[test]
    fn clean_cases() {
        use Affinity::*;
        let cases: &[(&[(&str, &str)], ServiceMeshOptions)] = &[
            (&[], opts(false, false, None)),
            (&[(GLOBAL, "true")], opts(true, true, None)),
            (&[(GLOBAL, "TRUE")], opts(true, true, None)),
            (&[(GLOBAL, "false")], opts(false, false, None)),
            (&[(GLOBAL_ALIAS, "true")], opts(true, true, None)),
            (
                &[(GLOBAL, "true"), (SHARED, "false")],
                opts(true, false, None),
            ),
            (
                &[(GLOBAL, "true"), (SHARED, "true")],
                opts(true, true, None),
            ),
            (
                &[(GLOBAL, "true"), (SHARED_ALIAS, "False")],
                opts(true, false, None),
            ),
            (
                &[(GLOBAL, "true"), (AFFINITY, "local")],
                opts(true, true, Local),
            ),
            (
                &[(GLOBAL, "true"), (AFFINITY, "Remote")],
                opts(true, true, Remote),
            ),
            (
                &[(GLOBAL, "true"), (AFFINITY_ALIAS, "remote")],
                opts(true, true, Remote),
            ),
            (
                &[(GLOBAL, "true"), (AFFINITY, "none")],
                opts(true, true, None),
            ),
            (
                &[
                    (GLOBAL, "true"),
                    (GLOBAL_ALIAS, "true"),
                    (AFFINITY, "local"),
                    (AFFINITY_ALIAS, "LOCAL"),
                ],
                opts(true, true, Local),
            ),
            (&[("other", "x"), (GLOBAL, "true")], opts(true, true, None)),
        ];
        for (annotations, expected) in cases {
            let (got, warnings) = parse(annotations);
            assert_eq!(got, *expected, "{annotations:?}");
            assert!(warnings.is_empty(), "{annotations:?}: {warnings:?}");
        }
    }

    /// `none` behaves exactly like no affinity annotation at all.
    #[test]
    fn none_is_absent() {
        for extra in [vec![], vec![(SHARED, "false")]] {
            let mut with_none = vec![(GLOBAL, "true"), (AFFINITY, "none")];
            with_none.extend(extra.iter().copied());
            let mut without = vec![(GLOBAL, "true")];
            without.extend(extra.iter().copied());
            assert_eq!(parse(&with_none), parse(&without));
        }
    }

    #[test]
    fn bad_values_warn_and_count_as_absent() {
        let (got, warnings) = parse(&[(GLOBAL, "true"), (AFFINITY, "sideways")]);
        assert_eq!(got, opts(true, true, Affinity::None));
        assert_eq!(warnings.len(), 1);
        let msg = warnings[0].to_string();
        assert!(
            msg.contains(AFFINITY) && msg.contains("\"sideways\""),
            "{msg}"
        );

        let (got, warnings) = parse(&[(GLOBAL, "yes")]);
        assert_eq!(got, opts(false, false, Affinity::None));
        assert_eq!(
            warnings,
            vec![AnnotationWarning::InvalidValue {
                annotation: GLOBAL,
                value: "yes".into(),
                expected: BOOL_VALUES
            }]
        );
        assert!(warnings[0].to_string().contains("\"yes\""));

        // An invalid current name counts as absent, so a valid alias applies.
        let (got, warnings) = parse(&[(GLOBAL, "1"), (GLOBAL_ALIAS, "true")]);
        assert_eq!(got, opts(true, true, Affinity::None));
        assert_eq!(warnings.len(), 1);

        let (got, warnings) = parse(&[(GLOBAL, "true"), (SHARED, "")]);
        assert_eq!(got, opts(true, true, Affinity::None));
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn current_name_beats_alias() {
        let (got, warnings) = parse(&[(GLOBAL, "true"), (GLOBAL_ALIAS, "false")]);
        assert_eq!(got, opts(true, true, Affinity::None));
        assert_eq!(
            warnings,
            vec![AnnotationWarning::Conflict {
                annotation: GLOBAL,
                value: "true".into(),
                alias: GLOBAL_ALIAS,
                alias_value: "false".into()
            }]
        );

        let (got, warnings) = parse(&[(GLOBAL, "false"), (GLOBAL_ALIAS, "true")]);
        assert_eq!(got, opts(false, false, Affinity::None));
        assert_eq!(warnings.len(), 1);

        let (got, warnings) = parse(&[
            (GLOBAL, "true"),
            (AFFINITY, "none"),
            (AFFINITY_ALIAS, "local"),
        ]);
        assert_eq!(got, opts(true, true, Affinity::None));
        let msg = warnings[0].to_string();
        assert!(
            msg.contains(AFFINITY) && msg.contains(AFFINITY_ALIAS),
            "{msg}"
        );

        let (got, _) = parse(&[(GLOBAL, "true"), (SHARED, "true"), (SHARED_ALIAS, "false")]);
        assert!(got.shared);
    }

    #[test]
    fn options_need_global() {
        let (got, warnings) = parse(&[(SHARED, "true"), (AFFINITY_ALIAS, "local")]);
        assert_eq!(got, ServiceMeshOptions::default());
        assert_eq!(
            warnings,
            vec![
                AnnotationWarning::NotGlobal { annotation: SHARED },
                AnnotationWarning::NotGlobal {
                    annotation: AFFINITY_ALIAS
                },
            ]
        );
    }
}
