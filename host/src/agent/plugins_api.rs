//! Admin endpoints for plugins: list, show, load, replace, unload.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/plugins | | `[PluginSummary]` |
//! | GET | /v1/plugins/{name} | | `PluginSummary` |
//! | POST | /v1/plugins | `PluginSpec` | `PluginSummary` (201) |
//! | PUT | /v1/plugins/{name} | `ReplaceSpec` (what changes; the rest is kept) | `PluginSummary` |
//! | DELETE | /v1/plugins/{name} | | `{"unloaded": name}` |

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use super::plugin_admin::{PluginAdmin, ReplaceSpec};
use crate::api::{json_response, ok, read_json, ApiError, Response};
use crate::plugin::PluginSpec;

/// Serves `/v1/plugins...`; `rest` is the path after `/v1/plugins`. Loads and
/// replaces are held to the agent's plugin policy and recorded.
pub async fn handle(
    admin: &PluginAdmin,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response, ApiError> {
    let method = req.method().clone();
    match (method, rest) {
        (Method::GET, []) => ok(&admin.host().list()),
        (Method::GET, [name]) => ok(&admin.host().get(name)?),
        (Method::POST, []) => {
            let spec: PluginSpec = read_json(req.into_body()).await?;
            let summary = admin.load(spec).await?;
            Ok(json_response(StatusCode::CREATED, &summary))
        }
        (Method::PUT, [name]) => {
            let name = name.to_string();
            let change: ReplaceSpec = read_json(req.into_body()).await?;
            ok(&admin.replace(&name, change).await?)
        }
        (Method::DELETE, [name]) => {
            admin.unload(name)?;
            ok(&serde_json::json!({ "unloaded": name }))
        }
        (m, _) => Err(ApiError::no_route(&m, req.uri().path())),
    }
}
