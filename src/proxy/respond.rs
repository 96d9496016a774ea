//! Every response egressd itself writes to a proxy client: denials with the
//! `X-Egressd-Deny` header, and the mapping of each failure to its status code.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;
use crate::policy::Reason;

/// The header naming the rule, reason and request id of a denial.
pub const DENY_HEADER: &str = "x-egressd-deny";

/// The status a client sees for a denial with `reason`.
pub fn status_for(reason: Reason) -> StatusCode {
    match reason {
        Reason::BodyLimit | Reason::UploadLimit => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::FORBIDDEN,
    }
}

/// A denial: `status`, the deny header and a short text body.
pub fn deny(status: StatusCode, rule: &str, reason: Reason, id: &str) -> Response<ProxyBody> {
    let body = format!("egressd: request denied (rule={rule}; reason={reason}; id={id})\n");
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let header = format!("rule={rule}; reason={reason}; id={id}");
    // Rule names are validated to a header-safe alphabet; the fallback is defensive only.
    let value = HeaderValue::from_str(&header).unwrap_or_else(|_| HeaderValue::from_static("reason=malformed"));
    let headers = resp.headers_mut();
    headers.insert(DENY_HEADER, value);
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// An upstream failure (502 unreachable, 504 connect timeout), with the deny header so the
/// client can tell egressd's answer from the origin's.
pub fn upstream_failure(status: StatusCode, rule: &str, id: &str) -> Response<ProxyBody> {
    deny(status, rule, Reason::Upstream, id)
}

pub fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}
