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

/// The URL without its `user[:password]@`, and the user and password it carried
/// (percent-decoded), for a client that sends them in a header instead.
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    match userinfo(url) {
        Some((a, b)) => {
            let info = &url[a..b - 1];
            let (user, password) = info.split_once(':').unwrap_or((info, ""));
            (format!("{}{}", &url[..a], &url[b..]), Some((percent_decoded(user), percent_decoded(password))))
        }
        None => (url.to_string(), None),
    }
}

/// `%XX` escapes decoded (a password with `@` or `:` is written `%40`, `%3A` in a URL).
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_split_from_a_url_and_decoded() {
        assert_eq!(
            split_credentials("https://ann:p%40ss%3Aw@host:8443/dav/x"),
            ("https://host:8443/dav/x".to_string(), Some(("ann".to_string(), "p@ss:w".to_string())))
        );
        assert_eq!(split_credentials("http://tok@h/p").1, Some(("tok".to_string(), String::new())));
        assert_eq!(split_credentials("http://h/p@q"), ("http://h/p@q".to_string(), None));
        assert_eq!(percent_decoded("100%"), "100%", "a lone % is kept");
    }

    #[test]
    fn credentials_are_found_and_replaced_and_nothing_else_is() {
        assert_eq!(url("https://user:s3cret@host:8443/score?x=1"), "https://***@host:8443/score?x=1");
        assert_eq!(url("http://tok@h/p"), "http://***@h/p");
        assert!(has_credentials("http://a:b@h") && !has_credentials("http://h/p@q"));
        assert_eq!(url("http://h/path@not-userinfo"), "http://h/path@not-userinfo");
    }
}
