//! The node agent's endpoint API (`model::endpoint`), over a small blocking HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use model::endpoint::{ApiError, EndpointRegistration};

/// How long one call may take: the agent is on the same node, and the runtime is waiting.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The agent did not take a call.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No answer: the agent is down, refuses connections or is too slow.
    #[error("agent at {agent} is unreachable")]
    Unreachable {
        /// The agent's API address.
        agent: SocketAddr,
        /// Why.
        #[source]
        source: ureq::Error,
    },
    /// The agent answered with an error status.
    #[error("agent at {agent} refused: {status} {message}")]
    Refused {
        /// The agent's API address.
        agent: SocketAddr,
        /// The HTTP status.
        status: u16,
        /// The agent's [`ApiError`] text, or the raw body when it sent something else.
        message: String,
    },
}

/// A client of one agent's API.
#[derive(Debug)]
pub struct AgentClient {
    address: SocketAddr,
    http: ureq::Agent,
}

impl AgentClient {
    /// A client of the agent at `address`; no proxy, since the agent is on this node.
    pub fn new(address: SocketAddr) -> Self {
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        AgentClient { address, http }
    }

    fn url(&self, container_id: &str) -> String {
        format!("http://{}/v1/endpoints/{container_id}", self.address)
    }

    /// `PUT /v1/endpoints/{container_id}`.
    pub fn register(&self, registration: &EndpointRegistration) -> Result<(), AgentError> {
        let body = serde_json::to_vec(registration).expect("a registration always serializes");
        let response = self
            .http
            .put(&self.url(&registration.container_id))
            .header("content-type", "application/json")
            .send(body);
        self.answer(response)
    }

    /// `DELETE /v1/endpoints/{container_id}`; the agent answers 200 for unknown ones too.
    pub fn deregister(&self, container_id: &str) -> Result<(), AgentError> {
        let response = self.http.delete(&self.url(container_id)).call();
        self.answer(response)
    }

    fn answer(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(), AgentError> {
        let mut response = response.map_err(|source| AgentError::Unreachable {
            agent: self.address,
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or(body);
        Err(AgentError::Refused {
            agent: self.address,
            status: status.as_u16(),
            message,
        })
    }
}
