//! Request-body extraction with our own error bodies: axum's default JSON rejection is plain text
//! and does not name the parameter; an OpenAI client expects `{"error": {..., "param"}}`.

use super::error::ApiError;
use axum::extract::Request;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Largest request body accepted. A 128k-token prompt as a JSON token array is about 1 MiB;
/// 16 MiB leaves room for long text prompts and chat histories without letting one request
/// exhaust memory.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Reads the request body and parses it as `T`; errors become 400s naming the field at fault
/// (413 past [`MAX_BODY_BYTES`]).
pub async fn read_json<T: DeserializeOwned>(req: Request) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("could not read the request body (limit {MAX_BODY_BYTES} bytes): {e}"),
            )
        })?;
    parse(&bytes)
}

/// Parses `bytes` as `T`; on error names the parameter (its JSON path) in `param`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read a struct from an array too, and blame "[0]"; every body here is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." && inner.classify() == serde_json::error::Category::Data {
            // A flattened field (the shared sampling parameters) loses its path in serde;
            // parsing those parameters alone finds it again.
            let mut de = serde_json::Deserializer::from_slice(bytes);
            if let Err(e) =
                serde_path_to_error::deserialize::<_, super::types::SamplingRequest>(&mut de)
            {
                let path = e.path().to_string();
                return describe(path, e.inner());
            }
        }
        describe(path, &inner)
    })?;
    de.end().map_err(|e| describe(".".into(), &e))?;
    Ok(value)
}

fn describe(path: String, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let msg = e.to_string();
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(format!("the request body is not valid JSON: {msg}"))
        }
        Category::Data => {
            // serde's own wording names the field for these two; the path names its parent.
            if let Some(field) = between_backticks(&msg, "unknown field `") {
                let param = join(&path, &field);
                return ApiError::invalid(
                    param.clone(),
                    format!("unrecognized request argument supplied: {param}"),
                );
            }
            if let Some(field) = between_backticks(&msg, "missing field `") {
                let param = join(&path, &field);
                return ApiError::invalid(
                    param.clone(),
                    format!("missing required parameter: {param}"),
                );
            }
            if path == "." {
                ApiError::bad_request(format!("invalid request body: {msg}"))
            } else {
                ApiError::invalid(path.clone(), format!("invalid value for {path}: {msg}"))
            }
        }
    }
}

fn between_backticks(msg: &str, lead: &str) -> Option<String> {
    let rest = &msg[msg.find(lead)? + lead.len()..];
    Some(rest[..rest.find('`')?].to_string())
}

/// `path.field`, unless `path` already ends with the field (serde_path_to_error records the
/// unknown field itself, but only the parent of a missing one).
fn join(path: &str, field: &str) -> String {
    if path == field || path.ends_with(&format!(".{field}")) {
        path.to_string()
    } else if path == "." || path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        a: u32,
        inner: Option<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        b: bool,
    }

    #[test]
    fn names_the_parameter() {
        let e = parse::<Body>(br#"{"a": "x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("a"));
        let e = parse::<Body>(br#"{"a": 1, "zzz": 2}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("zzz"));
        let e = parse::<Body>(br#"{"a": 1, "inner": {"c": 1}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("inner.c"));
        let e = parse::<Body>(br#"{"inner": null}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("a"));
        let e = parse::<Body>(br#"{"a": 1"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.param.is_none());
        let e = parse::<Body>(br#"{"a": 1} x"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(parse::<Body>(br#"{"a": 1}"#).is_ok());
    }
}
