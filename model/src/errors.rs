//! Errors as text, for logs, status records and messages that cross a process boundary.

/// An error and its sources as one line: each source joined with `: `, for logs and status
/// fields, because the `Display` of a wrapping error alone hides the cause (a "permission
/// denied" behind "rejected lease_grant"). A source whose text the line already holds is not
/// repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("rejected lease_grant")]
        Rejected(#[source] std::io::Error),
        #[error("store: {0}")]
        Repeats(#[source] std::io::Error),
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let denied =
            || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        assert_eq!(
            error_chain(&Outer::Rejected(denied())),
            "rejected lease_grant: permission denied"
        );
        assert_eq!(
            error_chain(&Outer::Repeats(denied())),
            "store: permission denied"
        );
    }
}
