"""The federation: the ClientApp's handlers (:mod:`.client`), Flower's strategies and DP wrappers
behind the guard that screens every reply (:mod:`.strategy`), and the ServerApp's run
(:mod:`.server`)."""
