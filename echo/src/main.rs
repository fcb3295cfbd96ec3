//! `mesh-echo`: a tiny server that answers every TCP line and UDP datagram with its own name
//! (cluster/node/pod), and a probe that asks a service many times and counts who answered.
//!
//! - `mesh-echo serve --name a/node-1/web-0 --tcp 0.0.0.0:8080 --udp 0.0.0.0:8080`
//! - `mesh-echo probe --tcp 10.96.0.10:80 --count 100`: one new connection per request;
//!   prints one JSON summary (answers per name, failures, the peer address `getpeername`
//!   reported) and exits 1 if any request failed.
//! - `mesh-echo probe --udp 10.96.0.10:53 --count 100`: one unconnected socket, `sendto`.
//! - `mesh-echo stream --tcp ADDR --duration 10s`: one long-lived connection, a line every
//!   interval; exits 1 on the first failure.
//!
//! Answers are `<name> <request>\n` (TCP) and `<name> <request>` (UDP).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-echo",
    version,
    about = "Echo server and probe for local mesh clusters"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Answer TCP lines and UDP datagrams with our name.
    Serve {
        /// The name to answer with (e.g. cluster/node/pod).
        #[arg(long)]
        name: String,
        /// TCP addresses to listen on.
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        /// UDP addresses to listen on.
        #[arg(long)]
        udp: Vec<SocketAddr>,
    },
    /// Ask a service `count` times and count who answered.
    Probe {
        /// A TCP service: one new connection per request.
        #[arg(long, conflicts_with = "udp", required_unless_present = "udp")]
        tcp: Option<SocketAddr>,
        /// A UDP service: one socket, a datagram per request.
        #[arg(long)]
        udp: Option<SocketAddr>,
        /// Requests.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Pause between requests.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        interval: Duration,
        /// Timeout of one request.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        /// The local address to send from (TCP).
        #[arg(long)]
        source: Option<std::net::IpAddr>,
    },
    /// Keep one TCP connection and send a line every interval.
    Stream {
        /// The service.
        #[arg(long)]
        tcp: SocketAddr,
        /// How long.
        #[arg(long, value_parser = parse_duration)]
        duration: Duration,
        /// Pause between lines.
        #[arg(long, default_value = "50ms", value_parser = parse_duration)]
        interval: Duration,
        /// Timeout of one answer.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?}: a duration needs a unit (ms or s)"))?;
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("{text:?}: the unit must be ms or s")),
    }
}

/// What a probe or stream saw.
#[derive(Debug, Default, Serialize)]
struct Summary {
    /// Answers per name.
    answers: BTreeMap<String, u32>,
    /// Failed requests.
    failures: u32,
    /// The first few errors.
    errors: Vec<String>,
    /// The peer addresses `getpeername` reported (TCP).
    peers: BTreeMap<String, u32>,
    /// The addresses answers came from (UDP `recvfrom`).
    sources: BTreeMap<String, u32>,
}

impl Summary {
    fn fail(&mut self, error: String) {
        self.failures += 1;
        if self.errors.len() < 5 {
            self.errors.push(error);
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Cmd::Serve { name, tcp, udp } => serve(&name, &tcp, &udp),
        Cmd::Probe {
            tcp,
            udp,
            count,
            interval,
            timeout,
            source,
        } => {
            let summary = match (tcp, udp) {
                (Some(addr), _) => probe_tcp(addr, source, count, interval, timeout),
                (None, Some(addr)) => probe_udp(addr, count, interval, timeout),
                (None, None) => unreachable!("clap requires one of --tcp and --udp"),
            };
            report(&summary)
        }
        Cmd::Stream {
            tcp,
            duration,
            interval,
            timeout,
        } => report(&stream(tcp, duration, interval, timeout)),
    }
}

fn report(summary: &Summary) -> ExitCode {
    println!(
        "{}",
        serde_json::to_string(summary).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
    if summary.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn serve(name: &str, tcp: &[SocketAddr], udp: &[SocketAddr]) -> ExitCode {
    if tcp.is_empty() && udp.is_empty() {
        eprintln!("mesh-echo serve: give at least one --tcp or --udp address");
        return ExitCode::from(64);
    }
    let mut threads = Vec::new();
    for addr in tcp {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mesh-echo serve: --tcp {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || answer_tcp(&name, stream));
            }
        }));
    }
    for addr in udp {
        let socket = match UdpSocket::bind(addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mesh-echo serve: --udp {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let request = String::from_utf8_lossy(&buf[..n]);
                let _ = socket.send_to(format!("{name} {}", request.trim()).as_bytes(), from);
            }
        }));
    }
    eprintln!("mesh-echo serve: {name} listening on tcp {tcp:?} udp {udp:?}");
    for thread in threads {
        let _ = thread.join();
    }
    ExitCode::SUCCESS
}

fn answer_tcp(name: &str, stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writer
            .write_all(format!("{name} {}\n", line.trim()).as_bytes())
            .is_err()
        {
            return;
        }
    }
}

/// One request on a connection: a line out, a line back; the answer's name.
fn ask(reader: &mut BufReader<TcpStream>, request: u32) -> Result<String, String> {
    let mut writer = reader.get_ref();
    writer
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("closed by the server".to_owned()),
        Ok(_) => {
            let (name, number) = line
                .trim_end()
                .rsplit_once(' ')
                .ok_or_else(|| format!("bad answer {line:?}"))?;
            if number != request.to_string() {
                return Err(format!("answer {number} to request {request}"));
            }
            Ok(name.to_owned())
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

fn connect(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

fn probe_tcp(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    count: u32,
    interval: Duration,
    timeout: Duration,
) -> Summary {
    let mut summary = Summary::default();
    for request in 0..count {
        if request > 0 {
            std::thread::sleep(interval);
        }
        let stream = match connect(addr, source, timeout) {
            Ok(s) => s,
            Err(e) => {
                summary.fail(format!("connect {addr}: {e}"));
                continue;
            }
        };
        if let Ok(peer) = stream.peer_addr() {
            *summary.peers.entry(peer.to_string()).or_default() += 1;
        }
        let _ = stream.set_read_timeout(Some(timeout));
        match ask(&mut BufReader::new(stream), request) {
            Ok(name) => *summary.answers.entry(name).or_default() += 1,
            Err(e) => summary.fail(e),
        }
    }
    summary
}

fn probe_udp(addr: SocketAddr, count: u32, interval: Duration, timeout: Duration) -> Summary {
    let mut summary = Summary::default();
    let socket = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            summary.fail(format!("bind: {e}"));
            return summary;
        }
    };
    let _ = socket.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 1500];
    for request in 0..count {
        if request > 0 {
            std::thread::sleep(interval);
        }
        if let Err(e) = socket.send_to(request.to_string().as_bytes(), addr) {
            summary.fail(format!("send to {addr}: {e}"));
            continue;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let Some((name, number)) = text.rsplit_once(' ') else {
                        summary.fail(format!("bad answer {text:?}"));
                        break;
                    };
                    if number != request.to_string() {
                        // A late answer to an earlier request: not this one.
                        if Instant::now() < deadline {
                            continue;
                        }
                        summary.fail(format!("no answer to request {request}"));
                        break;
                    }
                    *summary.sources.entry(from.to_string()).or_default() += 1;
                    *summary.answers.entry(name.to_owned()).or_default() += 1;
                    break;
                }
                Err(e) => {
                    summary.fail(format!("recv: {e}"));
                    break;
                }
            }
        }
    }
    summary
}

fn stream(addr: SocketAddr, duration: Duration, interval: Duration, timeout: Duration) -> Summary {
    let mut summary = Summary::default();
    let stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            summary.fail(format!("connect {addr}: {e}"));
            return summary;
        }
    };
    if let Ok(peer) = stream.peer_addr() {
        *summary.peers.entry(peer.to_string()).or_default() += 1;
    }
    let _ = stream.set_read_timeout(Some(timeout));
    let mut reader = BufReader::new(stream);
    let end = Instant::now() + duration;
    let mut request = 0;
    while Instant::now() < end {
        match ask(&mut reader, request) {
            Ok(name) => *summary.answers.entry(name).or_default() += 1,
            Err(e) => {
                summary.fail(e);
                break;
            }
        }
        request += 1;
        std::thread::sleep(interval);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn probes_count_answers_over_loopback() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                std::thread::spawn(move || answer_tcp("a/n/p", s));
            }
        });
        let summary = probe_tcp(addr, None, 3, Duration::ZERO, Duration::from_secs(2));
        assert_eq!(summary.failures, 0, "{summary:?}");
        assert_eq!(summary.answers["a/n/p"], 3);
        assert_eq!(summary.peers[&addr.to_string()], 3);
    }
}
