//! [`Proxy`]: a loopback TCP proxy to the test broker, which stands in for a node of a cluster so
//! that a test can make the broker appear, vanish, go silent or cut a login for one client
//! without touching it for the other tests; and the test broker's URL at another address.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::amqp_url;

/// What a [`Proxy`] does to a connection's login: the client's first frame after the protocol
/// header (connection.start-ok, which carries the credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFault {
    /// Closes the connection instead of passing the login on: a node that dies or stops just
    /// then.
    Cut,
    /// Keeps the connection open and never passes the login on: a node too busy to answer.
    Stall,
}

/// A loopback TCP proxy to the test broker, to make the broker appear and disappear for one
/// client without stopping it for every test.
pub struct Proxy {
    ip: std::net::IpAddr,
    pub port: u16,
    /// While set, the proxy keeps every connection open but forwards nothing: a dead network.
    frozen: Arc<std::sync::atomic::AtomicBool>,
    /// Faults for the logins of the next connections, one each, in order of their accept.
    login_faults: Arc<std::sync::Mutex<std::collections::VecDeque<LoginFault>>>,
    /// Bytes read from clients, forwarded or held.
    received: Arc<std::sync::atomic::AtomicU64>,
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// A free loopback port on which nothing listens yet.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port()
    }

    /// Starts forwarding `port` of 127.0.0.1 to the test broker.
    pub fn start(port: u16) -> Proxy {
        Proxy::start_on(std::net::Ipv4Addr::LOCALHOST.into(), port)
    }

    /// Starts forwarding `port` of the loopback address `ip` to the test broker.
    pub fn start_on(ip: std::net::IpAddr, port: u16) -> Proxy {
        use std::net::{TcpListener, TcpStream};
        let url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
        let target = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(5672)
        );
        let listener = TcpListener::bind((ip, port)).expect("bind the proxy port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frozen_in_thread = Arc::clone(&frozen);
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let received_in_thread = Arc::clone(&received);
        let login_faults = Arc::default();
        let login_faults_in_thread = Arc::clone(&login_faults);
        let thread = thread::spawn(move || {
            let frozen = frozen_in_thread;
            let received = received_in_thread;
            let login_faults: Arc<std::sync::Mutex<std::collections::VecDeque<LoginFault>>> =
                login_faults_in_thread;
            let mut open: Vec<TcpStream> = Vec::new();
            loop {
                if !matches!(
                    stopped.try_recv(),
                    Err(crossbeam_channel::TryRecvError::Empty)
                ) {
                    for stream in open {
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    return;
                }
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        let fault = login_faults.lock().expect("login faults").pop_front();
                        for (mut from, mut to, count, fault) in [
                            (
                                client.try_clone().unwrap(),
                                server.try_clone().unwrap(),
                                Some(Arc::clone(&received)),
                                fault,
                            ),
                            (
                                server.try_clone().unwrap(),
                                client.try_clone().unwrap(),
                                None,
                                None,
                            ),
                        ] {
                            let frozen = Arc::clone(&frozen);
                            thread::spawn(move || {
                                use std::io::{Read, Write};
                                let mut buf = [0u8; 16 * 1024];
                                // The client's bytes so far: the protocol header is 8, and
                                // the login comes after it.
                                let mut sent = 0;
                                while let Ok(n @ 1..) = from.read(&mut buf) {
                                    if let Some(count) = &count {
                                        count.fetch_add(n as u64, Ordering::SeqCst);
                                    }
                                    sent += n;
                                    match fault {
                                        Some(LoginFault::Cut) if sent > 8 => {
                                            let _ = from.shutdown(std::net::Shutdown::Both);
                                            break;
                                        }
                                        Some(LoginFault::Stall) if sent > 8 => continue,
                                        _ => {}
                                    }
                                    // Hold what was read until the network "comes back".
                                    while frozen.load(Ordering::SeqCst) {
                                        thread::sleep(Duration::from_millis(10));
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                        open.push(client);
                        open.push(server);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            ip,
            port,
            frozen,
            login_faults,
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops forwarding without closing anything, as a dead network does.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Makes the login of the next connection accepted fail with `fault`; called again, of the
    /// connection after it.
    pub fn fail_next_login(&self, fault: LoginFault) {
        self.login_faults
            .lock()
            .expect("login faults")
            .push_back(fault);
    }

    /// Login faults not yet used by a connection.
    pub fn login_faults_left(&self) -> usize {
        self.login_faults.lock().expect("login faults").len()
    }

    /// Forwards again, including what was held while frozen.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// How many bytes clients have sent through the proxy so far (forwarded or held).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// The test broker's URL, through this proxy.
    pub fn url(&self) -> String {
        let host = match self.ip {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        url_at(&host, self.port)
    }
}

/// The test broker's URL with its port replaced by `port`, on 127.0.0.1.
pub fn proxied_url(port: u16) -> String {
    url_at("127.0.0.1", port)
}

fn url_at(host: &str, port: u16) -> String {
    let mut url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
    url.set_host(Some(host)).expect("set host");
    url.set_port(Some(port)).expect("set port");
    url.to_string()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The connections are shut down: what a frozen proxy held is dropped, not delivered,
        // and its forwarding threads end.
        self.frozen.store(false, Ordering::SeqCst);
    }
}
