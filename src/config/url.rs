//! Store URLs: hiding their credentials ([`redact_url`], [`redact_text`]), and the parameters
//! this crate reads out of them (`namespace`, PostgreSQL's `sslrootcert`).

/// `url` with every credential hidden, for messages, logs and `Debug`: the whole user info
/// (everything between `scheme://` and the **last** `@`, so a password holding `/`, `@`, `:`,
/// `?` or `#`, percent-encoded or not, is hidden whole) and the values of query parameters
/// that carry secrets (`password`, `pass`, `passwd`, `pwd`, `secret`, `token`, `auth`,
/// `sslpassword`, any case). A user name is kept when a `:` separates it from a password.
///
/// ```
/// use bevy_storage::config::redact_url;
/// assert_eq!(redact_url("redis://:s3/cr3t@host:6379/0"), "redis://:***@host:6379/0");
/// assert_eq!(redact_url("redis://alice:p@ss@host"), "redis://alice:***@host");
/// assert_eq!(redact_url("postgres://host/db?password=x"), "postgres://host/db?password=***");
/// assert_eq!(redact_url("sqlite:saves/storage.db"), "sqlite:saves/storage.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once(':') else {
        return url.to_owned();
    };
    let (slashes, rest) = match rest.strip_prefix("//") {
        Some(rest) => ("//", rest),
        None => ("", rest),
    };
    // The user info ends at the last `@`: a password may hold any character, and an `@` in
    // a path or query only hides more than needed.
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#']) => format!("{user}:***@"),
                _ => "***@".to_owned(),
            };
            (shown, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    let after = match after.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if is_secret_parameter(name) => format!("{name}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            let mut out = format!("{path}?{}", query.join("&"));
            if let Some(fragment) = fragment {
                out.push('#');
                out.push_str(fragment);
            }
            out
        }
        None => after.to_owned(),
    };
    format!("{scheme}:{slashes}{userinfo}{after}")
}

/// `text` (an error message from a client library that saw `url`) with every credential of
/// `url` replaced by `***`, as written and percent-decoded: for messages that may quote parts
/// of a URL [`redact_url`] cannot see. A custom backend that connects with a URL passes its
/// client's errors through it.
///
/// ```
/// use bevy_storage::config::redact_text;
/// let url = "redis://:pa%2Fss@host";
/// assert_eq!(redact_text("auth failed for pa/ss", url), "auth failed for ***");
/// ```
pub fn redact_text(text: &str, url: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    if let Some((_, rest)) = url.split_once(':') {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            secrets.push(userinfo.to_owned());
            if let Some((_, password)) = userinfo.split_once(':') {
                secrets.push(password.to_owned());
            }
        }
        if let Some((_, query)) = rest.split_once('?') {
            for pair in query.split(['&', '#']) {
                if let Some((name, value)) = pair.split_once('=')
                    && is_secret_parameter(name)
                {
                    secrets.push(value.to_owned());
                }
            }
        }
    }
    let decoded: Vec<String> = secrets.iter().map(|s| percent_decode(s)).collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    // Longest first, so that a password is not left half hidden by a shorter piece.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for secret in &secrets {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

/// `%XX` escapes decoded (invalid ones kept as they are), as URL parsers read user info.
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "pass",
        "passwd",
        "pwd",
        "secret",
        "token",
        "auth",
        "sslpassword",
    ]
    .contains(&name.as_str())
}

/// Splits a `?namespace=NAME` parameter off a store URL: the URL to connect to (other query
/// parameters kept) and the namespace (`default` when absent).
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn split_namespace(url: &str, default: &str) -> (String, String) {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (base, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, q),
        None => (before_fragment, ""),
    };
    let mut namespace = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("namespace=") {
            Some(ns) => {
                namespace = Some(ns.to_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let out = join_url(base, &kept, fragment);
    (out, namespace.unwrap_or_else(|| default.to_owned()))
}

/// `url` with `sslrootcert=path` (percent-encoded) in place of any it had, and
/// `sslmode=verify-full` when it names no `sslmode`.
#[cfg(feature = "postgres-tls")]
pub(super) fn with_root_cert(url: &str, path: &str) -> String {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (base, query) = before_fragment
        .split_once('?')
        .unwrap_or((before_fragment, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslrootcert="))
        .map(str::to_owned)
        .collect();
    let has_mode = pairs.iter().any(|p| p.starts_with("sslmode="));
    let mut encoded = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    pairs.push(format!("sslrootcert={encoded}"));
    if !has_mode {
        pairs.push("sslmode=verify-full".to_owned());
    }
    let mut out = format!("{base}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// A URL put back together from its part before the query, the query parameters kept, and
/// its fragment.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn join_url(base: &str, kept: &[&str], fragment: Option<&str>) -> String {
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}
