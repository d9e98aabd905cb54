//! The web chat page served at `GET /`: HTML, CSS and JavaScript embedded in the binary (no framework, no build step).
//!
//! The page's settings (whether it needs a token, the models it may offer, the origins allowed to hand it a token) are
//! rendered into the HTML once, at start, as a JSON data block the script reads; the strict Content-Security-Policy
//! runs no inline script, and a data block is not one. The script and the style sheet are served under names that
//! carry a hash of their content, so they can be cached for good while the HTML itself is revalidated on every load.

use serde::Serialize;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// What the page needs to know about the service it is served by.
#[derive(Debug, Clone, Serialize)]
pub struct PageSettings {
    /// `true` when the service checks tokens (`JWT_SECRET` set): the page asks for one.
    pub needs_token: bool,
    /// The models a request may name, the default first.
    pub models: Vec<String>,
    /// Origins (besides the page's own) allowed to embed the page and hand it a token with `postMessage`.
    pub embed_origins: Vec<String>,
}

/// One file of the page, ready to serve.
#[derive(Debug)]
pub struct Asset {
    pub body: String,
    pub content_type: &'static str,
    /// A strong validator of `body` (quoted, as an `ETag` is).
    pub etag: String,
    /// Served under a name that changes with the content: cacheable for good.
    pub immutable: bool,
}

/// The page and its assets, rendered once.
#[derive(Debug)]
pub struct Page {
    pub index: Asset,
    /// `(path, asset)`, path starting with `/assets/`.
    pub assets: Vec<(String, Asset)>,
    /// The `Content-Security-Policy` every file of the page is served with.
    pub csp: String,
}

impl Page {
    pub fn new(settings: &PageSettings) -> Self {
        let script = asset(SCRIPT.to_owned(), "text/javascript; charset=utf-8", true);
        let style = asset(STYLE.to_owned(), "text/css; charset=utf-8", true);
        let script_path = format!("/assets/app.{}.js", hash_hex(SCRIPT));
        let style_path = format!("/assets/app.{}.css", hash_hex(STYLE));
        let settings_json = serde_json::to_string(settings)
            .expect("page settings always serialize")
            // Inside <script type="application/json">, `<` could end the block early (`</script>`).
            .replace('<', "\\u003c");
        let html = INDEX
            .replace("{{script}}", &script_path)
            .replace("{{style}}", &style_path)
            .replace("{{settings}}", &settings_json);
        let index = asset(html, "text/html; charset=utf-8", false);
        // An origin that could end a directive or the header is left out, never the whole policy.
        let origins: Vec<&str> = settings
            .embed_origins
            .iter()
            .map(String::as_str)
            .filter(|origin| plain_origin(origin))
            .collect();
        let ancestors = if origins.is_empty() {
            "'self'".to_owned()
        } else {
            format!("'self' {}", origins.join(" "))
        };
        let csp = format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             base-uri 'none'; form-action 'none'; frame-ancestors {ancestors}"
        );
        Self {
            index,
            assets: vec![(script_path, script), (style_path, style)],
            csp,
        }
    }

    /// The asset served at `path`, if any.
    pub fn asset(&self, path: &str) -> Option<&Asset> {
        self.assets
            .iter()
            .find(|(at, _)| at == path)
            .map(|(_, asset)| asset)
    }
}

/// `scheme://host[:port]` and nothing that a Content-Security-Policy or a header would read as more.
fn plain_origin(origin: &str) -> bool {
    origin.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            && !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b";,'\"".contains(&b))
    })
}

fn asset(body: String, content_type: &'static str, immutable: bool) -> Asset {
    let etag = format!("\"{}\"", hash_hex(&body));
    Asset {
        body,
        content_type,
        etag,
        immutable,
    }
}

/// 64-bit FNV-1a of `text`, in hex: a content fingerprint for cache names, not a security check.
fn hash_hex(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PageSettings {
        PageSettings {
            needs_token: true,
            models: vec!["openai:gpt-4o".into(), "test".into()],
            embed_origins: vec!["https://app.example".into()],
        }
    }

    #[test]
    fn the_html_names_the_hashed_assets_it_is_served_with() {
        let page = Page::new(&settings());
        assert_eq!(page.assets.len(), 2);
        for (path, asset) in &page.assets {
            assert!(page.index.body.contains(path.as_str()), "{path}");
            assert!(asset.immutable);
            assert!(page.asset(path).is_some());
        }
        assert!(!page.index.body.contains("{{"));
        assert!(page.asset("/assets/app.0000000000000000.js").is_none());
    }

    #[test]
    fn settings_cannot_close_their_script_block() {
        let mut hostile = settings();
        hostile.models = vec!["</script><script>alert(1)</script>".into()];
        let page = Page::new(&hostile);
        assert!(!page.index.body.contains("</script><script>"));
        assert!(page.index.body.contains("\\u003c/script>"));
    }

    #[test]
    fn only_listed_origins_may_embed_the_page() {
        assert!(
            Page::new(&settings())
                .csp
                .ends_with("frame-ancestors 'self' https://app.example")
        );
        let mut alone = settings();
        alone.embed_origins.clear();
        assert!(Page::new(&alone).csp.ends_with("frame-ancestors 'self'"));
        let mut hostile = settings();
        hostile.embed_origins = vec![
            "https://ok.example".into(),
            "https://x; script-src *".into(),
            "https://a\r\nx: y".into(),
            "null".into(),
        ];
        let csp = Page::new(&hostile).csp;
        assert!(
            csp.ends_with("frame-ancestors 'self' https://ok.example"),
            "{csp}"
        );
        assert!(axum::http::HeaderValue::from_str(&csp).is_ok());
    }
}
