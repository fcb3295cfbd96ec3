//! A minimal client for the agent's API: HTTP/1.0 `GET` over loopback, no HTTP library.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a request to the agent's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {addr}: {source}")]
    Connect {
        /// The API address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The answer is not a well-formed HTTP response.
    #[error("the agent at {addr} sent a malformed response")]
    Malformed {
        /// The API address.
        addr: SocketAddr,
    },
    /// The agent answered with an error status.
    #[error("the agent at {addr} answered {status} to {path}: {body}")]
    Status {
        /// The API address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The body.
        body: String,
    },
    /// The body is not the JSON expected.
    #[error("the agent at {addr} sent unexpected JSON for {path}: {source}")]
    Json {
        /// The API address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// The parser's complaint.
        source: serde_json::Error,
    },
}

/// `GET path` on the agent's API; the body as bytes. HTTP/1.0, so the agent closes the
/// connection after the body.
pub async fn get_raw(addr: SocketAddr, path: &str) -> Result<Vec<u8>, ClientError> {
    let connect = |source| ClientError::Connect { addr, source };
    let mut stream = TcpStream::connect(addr).await.map_err(connect)?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(connect)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(connect)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ClientError::Malformed { addr })?;
    let head =
        std::str::from_utf8(&response[..split]).map_err(|_| ClientError::Malformed { addr })?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ClientError::Malformed { addr })?;
    let body = response[split + 4..].to_vec();
    if status != 200 {
        return Err(ClientError::Status {
            addr,
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(body)
}

/// `GET path` on the agent's API, decoded as `T`.
pub async fn get_json<T: DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T, ClientError> {
    let body = get_raw(addr, path).await?;
    serde_json::from_slice(&body).map_err(|source| ClientError::Json {
        addr,
        path: path.to_owned(),
        source,
    })
}
