//! Secrets kept out of what r1pipe prints and stores: the user name and
//! password a URL may carry (`https://user:pass@host/…`).

/// The `user[:password]@` part of a URL's authority, if there is one: (start, end) byte offsets.
fn userinfo(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')?;
    Some((start, start + at + 1))
}

/// Whether a URL carries a user name or password.
pub fn has_credentials(url: &str) -> bool {
    userinfo(url).is_some()
}

/// The URL with any user name and password replaced by `***`.
pub fn url(url: &str) -> String {
    match userinfo(url) {
        Some((a, b)) => format!("{}***@{}", &url[..a], &url[b..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_found_and_replaced_and_nothing_else_is() {
        assert_eq!(url("https://user:s3cret@host:8443/score?x=1"), "https://***@host:8443/score?x=1");
        assert_eq!(url("http://tok@h/p"), "http://***@h/p");
        assert!(has_credentials("http://a:b@h") && !has_credentials("http://h/p@q"));
        assert_eq!(url("http://h/path@not-userinfo"), "http://h/path@not-userinfo");
    }
}
