// Verify flashgate's X-Flashgate-Signature in a Go backend.
//
//	ok, reason := VerifyAdmission(r.Header, r.Method, r.URL.RequestURI(),
//		map[string][]byte{"k1": []byte(os.Getenv("FLASHGATE_SIGNING_KEY"))}, 60, time.Now().Unix())
//
// pathAndQuery is the request target exactly as received (r.URL.RequestURI() for an
// origin-form target). Refuse the order unless ok. Tested against flashgate's real output by
// tests/signing.rs; run as a program it reads one JSON case on stdin (see main).
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// VerifyAdmission returns (true, "ok") when the signature holds, else (false, reason).
func VerifyAdmission(h http.Header, method, pathAndQuery string, keys map[string][]byte, maxAge, now int64) (bool, string) {
	header := h.Get("X-Flashgate-Signature")
	if header == "" {
		return false, "no signature"
	}
	fields := map[string]string{}
	for _, part := range strings.Split(header, ",") {
		name, value, found := strings.Cut(strings.TrimSpace(part), "=")
		if _, dup := fields[name]; !found || dup || (name != "t" && name != "kid" && name != "v1") {
			return false, "malformed signature"
		}
		fields[name] = value
	}
	t, err := strconv.ParseInt(fields["t"], 10, 64)
	if len(fields) != 3 || err != nil || t < 0 {
		return false, "malformed signature"
	}
	key, ok := keys[fields["kid"]]
	if !ok {
		return false, "unknown key id"
	}
	if age := now - t; age > maxAge || age < -maxAge {
		return false, "signature too old"
	}
	signed := strings.Join([]string{
		fields["t"], fields["kid"], method, pathAndQuery,
		h.Get("X-Flashgate-Reservation"), h.Get("X-Flashgate-Sku"),
		h.Get("X-Flashgate-User"), h.Get("X-Flashgate-Quantity"),
	}, "\n")
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(signed))
	expected := hex.EncodeToString(mac.Sum(nil))
	if !hmac.Equal([]byte(expected), []byte(fields["v1"])) {
		return false, "signature does not match"
	}
	return true, "ok"
}

// main: {"headers": {...}, "method": "POST", "path": "/...", "keys": {"k1": "..."}, "now": 123}
func main() {
	var c struct {
		Headers map[string]string `json:"headers"`
		Method  string            `json:"method"`
		Path    string            `json:"path"`
		Keys    map[string]string `json:"keys"`
		Now     *int64            `json:"now"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&c); err != nil {
		fmt.Println("bad input:", err)
		os.Exit(2)
	}
	h := http.Header{}
	for k, v := range c.Headers {
		h.Set(k, v)
	}
	keys := map[string][]byte{}
	for id, k := range c.Keys {
		keys[id] = []byte(k)
	}
	now := time.Now().Unix()
	if c.Now != nil {
		now = *c.Now
	}
	ok, reason := VerifyAdmission(h, c.Method, c.Path, keys, 60, now)
	fmt.Println(reason)
	if !ok {
		os.Exit(1)
	}
}
