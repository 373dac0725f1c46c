//! An agent host in its own namespace: the agent sees only the test's interfaces and
//! reaches the shared broker through a veth and a relay (`10.<net>.1:5671`).

use super::broker::Broker;
use super::netns::{KillableRelay, Netns, relay, veth};
use super::{AgentProc, Host, HostOptions, env};

pub struct Site {
    /// The agent's namespace ("the host").
    pub ag: Netns,
    pub host: Host,
    pub brk: Netns,
    relay: Option<KillableRelay>,
    relay_at: (String, std::net::SocketAddr),
}

impl Site {
    /// `base`: namespace name prefix; `net`: three octets for the broker link (a /30).
    pub fn new(base: &str, net: &str, id: &str, opts: HostOptions) -> Site {
        Site::on(&env().broker, base, net, id, opts)
    }

    /// Same, in front of another broker than the shared one (the host's user is made there).
    pub fn on(broker: &Broker, base: &str, net: &str, id: &str, opts: HostOptions) -> Site {
        let brk = Netns::new(&format!("{base}-brk"));
        let ag = Netns::new(&format!("{base}-ag"));
        veth(
            &brk,
            "b0",
            &format!("{net}.1/30"),
            &ag,
            "e0",
            &format!("{net}.2/30"),
        );
        let target = format!("127.0.0.1:{}", broker.port).parse().unwrap();
        let listen = format!("{net}.1:5671");
        let relay = relay(&brk.name, &listen, target);
        broker.add_host_user(id);
        let host = env().host_on(
            broker,
            id,
            HostOptions {
                // The relay's address, unless the test names the broker otherwise (by DNS).
                urls: opts
                    .urls
                    .clone()
                    .or_else(|| Some(vec![format!("amqps://{net}.1:5671/%2f")])),
                server_name: Some("localhost".into()),
                ..opts
            },
        );
        Site {
            ag,
            host,
            brk,
            relay: Some(relay),
            relay_at: (listen, target),
        }
    }

    /// The broker goes away as a dead node does: connections reset, new ones refused.
    pub fn cut_broker(&mut self) {
        if let Some(r) = self.relay.take() {
            r.kill();
        }
    }

    /// The broker is reachable again.
    pub fn restore_broker(&mut self) {
        if self.relay.is_none() {
            let (listen, target) = &self.relay_at;
            self.relay = Some(relay(&self.brk.name, listen, *target));
        }
    }

    /// Starts the agent in the site's namespace and waits until it serves commands.
    pub fn start(&self, envs: &[(&str, &str)]) -> AgentProc {
        let a = AgentProc::start_in(&self.host, Some(&self.ag.name), envs);
        a.wait_serving();
        a
    }
}
