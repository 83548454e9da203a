// Istio's DNS proxy, alone: the code Istio's pilot-agent runs for DNS_PROXY_ADDR (istio.io/istio/pkg/dns/client,
// called as pkg/istio-agent/agent.go calls it), without the rest of the agent, so the Python proxy can be compared
// with it query by query and measured beside it. Upstream servers and search domains come from /etc/resolv.conf,
// as in the agent (tests run it in a network namespace whose resolv.conf they write).
//
//	istio-dns ADDRESS NAMESPACE DOMAIN TABLE.json TIMEOUT PARALLEL
//
// TABLE.json is an istio.networking.nds.v1.NameTable in protobuf JSON; "" for none (every query then gets
// SERVFAIL, as before istiod's first push). Prints "ready" once listening; SIGTERM stops it.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"istio.io/istio/pkg/dns/client"
	dnsProto "istio.io/istio/pkg/dns/proto"
)

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 7 {
		fail(fmt.Errorf("usage: istio-dns ADDRESS NAMESPACE DOMAIN TABLE.json TIMEOUT PARALLEL"))
	}
	addr, ns, domain, tablePath := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	timeout, err := time.ParseDuration(os.Args[5])
	if err != nil {
		fail(err)
	}
	parallel, err := strconv.ParseBool(os.Args[6])
	if err != nil {
		fail(err)
	}
	server, err := client.NewLocalDNSServer(ns, domain, addr,
		client.WithUpstreamTimeout(timeout), client.WithParallelForwarding(parallel))
	if err != nil {
		fail(err)
	}
	server.StartDNS()
	if tablePath != "" {
		data, err := os.ReadFile(tablePath)
		if err != nil {
			fail(err)
		}
		table := &dnsProto.NameTable{}
		if err := protojson.Unmarshal(data, table); err != nil {
			fail(err)
		}
		server.UpdateLookupTable(table)
	}
	fmt.Println("ready")
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	server.Close()
}
