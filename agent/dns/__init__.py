"""The DNS proxy on DNS_PROXY_ADDR: istiod's name table (NDS), forwarding to resolv.conf (README: DNS proxy)."""
