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
    _relay: KillableRelay,
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
        let relay = relay(&brk.name, &format!("{net}.1:5671"), target);
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
            _relay: relay,
        }
    }

    /// Starts the agent in the site's namespace and waits until it serves commands.
    pub fn start(&self, envs: &[(&str, &str)]) -> AgentProc {
        let a = AgentProc::start_in(&self.host, Some(&self.ag.name), envs);
        a.wait_serving();
        a
    }
}
