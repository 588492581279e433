//! Admin endpoints for plugins: list, show, load, replace, unload.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/plugins | | `[PluginSummary]` |
//! | GET | /v1/plugins/{name} | | `PluginSummary` |
//! | POST | /v1/plugins | `PluginSpec` | `PluginSummary` (201) |
//! | PUT | /v1/plugins/{name} | `PluginSpec` | `PluginSummary` |
//! | DELETE | /v1/plugins/{name} | | `{"unloaded": name}` |

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use crate::api::{json_response, ok, read_json, ApiError, Response};
use crate::plugin::{PluginHost, PluginSpec};

/// Serves `/v1/plugins...`; `rest` is the path after `/v1/plugins`.
pub async fn handle(
    host: &PluginHost,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response, ApiError> {
    let method = req.method().clone();
    match (method, rest) {
        (Method::GET, []) => ok(&host.list()),
        (Method::GET, [name]) => ok(&host.get(name)?),
        (Method::POST, []) => {
            let spec: PluginSpec = read_json(req.into_body()).await?;
            let summary = host.load(spec).await?;
            Ok(json_response(StatusCode::CREATED, &summary))
        }
        (Method::PUT, [name]) => {
            let name = name.to_string();
            let spec: PluginSpec = read_json(req.into_body()).await?;
            ok(&host.replace(&name, spec).await?)
        }
        (Method::DELETE, [name]) => {
            host.unload(name)?;
            ok(&serde_json::json!({ "unloaded": name }))
        }
        (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
    }
}
