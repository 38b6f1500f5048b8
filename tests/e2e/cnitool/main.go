// cnitool: a small cnitool-equivalent for the e2e tests (add, check, del), built against
// Debian's libcni (golang-github-appc-cni-dev) in GOPATH mode by tests/e2e/conftest.py:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode:<tmp> go build -o build/cnitool/cnitool ./tests/e2e/cnitool
//
// Usage and environment follow upstream cnitool:
//
//	cnitool add|check|del <network name> <netns path>
//
//	NETCONFPATH  directory of network configs (default /etc/cni/net.d); *.conflist first, then *.conf/*.json
//	CNI_PATH     plugin search path (colon-separated)
//	CNI_ARGS     "K=V;K2=V2" passed to the plugins as CNI_ARGS
//	CAP_ARGS     JSON object of capability arguments (runtimeConfig), e.g. {"ips":["10.0.0.5/24"]}
//	CNI_IFNAME   interface name in the netns (default eth0)
//
// Additions for tests (not in upstream cnitool):
//
//	CNI_CACHE_DIR    libcni's result cache (default /var/lib/cni); tests point it at a temp dir
//	CNI_CONTAINERID  the container ID (default, as upstream: "cnitool-" + first 10 bytes of
//	                 sha512(netns path) in hex)
//
// add prints the result JSON on stdout; errors go to stderr with exit status 1.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func usage() {
	exe := filepath.Base(os.Args[0])
	fmt.Fprintf(os.Stderr, "%s: add, check or remove a network interface in a network namespace\n", exe)
	fmt.Fprintf(os.Stderr, "  %s add   <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "  %s check <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "  %s del   <net> <netns>\n", exe)
	os.Exit(1)
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "%s\n", err)
	os.Exit(1)
}

// parseCNIArgs splits "K=V;K2=V2" the way upstream cnitool does (each pair needs a key and a value).
func parseCNIArgs(s string) ([][2]string, error) {
	var out [][2]string
	for _, pair := range strings.Split(s, ";") {
		kv := strings.SplitN(pair, "=", 2)
		if len(kv) != 2 || kv[0] == "" || kv[1] == "" {
			return nil, fmt.Errorf("invalid CNI_ARGS pair %q", pair)
		}
		out = append(out, [2]string{kv[0], kv[1]})
	}
	return out, nil
}

func main() {
	if len(os.Args) != 4 {
		usage()
	}
	cmd, netName := os.Args[1], os.Args[2]
	if cmd != "add" && cmd != "check" && cmd != "del" {
		usage()
	}

	netdir := os.Getenv("NETCONFPATH")
	if netdir == "" {
		netdir = "/etc/cni/net.d"
	}
	netconf, err := libcni.LoadConfList(netdir, netName)
	if err != nil {
		fail(err)
	}

	var capArgs map[string]interface{}
	if v := os.Getenv("CAP_ARGS"); v != "" {
		if err := json.Unmarshal([]byte(v), &capArgs); err != nil {
			fail(fmt.Errorf("CAP_ARGS: %v", err))
		}
	}
	var cniArgs [][2]string
	if v := os.Getenv("CNI_ARGS"); v != "" {
		if cniArgs, err = parseCNIArgs(v); err != nil {
			fail(err)
		}
	}
	ifName, ok := os.LookupEnv("CNI_IFNAME")
	if !ok {
		ifName = "eth0"
	}
	netns, err := filepath.Abs(os.Args[3])
	if err != nil {
		fail(err)
	}
	containerID := os.Getenv("CNI_CONTAINERID")
	if containerID == "" {
		sum := sha512.Sum512([]byte(netns))
		containerID = fmt.Sprintf("cnitool-%x", sum[:10])
	}

	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	rt := &libcni.RuntimeConf{
		ContainerID:    containerID,
		NetNS:          netns,
		IfName:         ifName,
		Args:           cniArgs,
		CapabilityArgs: capArgs,
	}
	ctx := context.Background()
	switch cmd {
	case "add":
		result, err := cni.AddNetworkList(ctx, netconf, rt)
		if result != nil {
			_ = result.Print()
		}
		if err != nil {
			fail(err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, netconf, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, netconf, rt); err != nil {
			fail(err)
		}
	}
}
