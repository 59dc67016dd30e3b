// A backend that does real work per request, for bench/run.sh and bench/scale.sh: it reads the
// request (query, headers, body), builds an order-like object of ~1 KB and marshals it to JSON,
// as a shop's handler would before any database call. Standard library only.
//
// Usage: go build -o backend bench/backend/main.go && ./backend -listen 127.0.0.1:3000
package main

import (
	"encoding/json"
	"flag"
	"io"
	"log"
	"net/http"
	"strconv"
	"strings"
	"time"
)

type line struct {
	SKU       string   `json:"sku"`
	Name      string   `json:"name"`
	UnitCents int      `json:"unit_cents"`
	Quantity  int      `json:"quantity"`
	Tags      []string `json:"tags"`
}

type order struct {
	Path        string              `json:"path"`
	Method      string              `json:"method"`
	Query       map[string][]string `json:"query"`
	User        string              `json:"user"`
	Reservation string              `json:"reservation,omitempty"`
	Sku         string              `json:"sku,omitempty"`
	Headers     int                 `json:"headers"`
	BodyBytes   int64               `json:"body_bytes"`
	Lines       []line              `json:"lines"`
	TotalCents  int                 `json:"total_cents"`
	Currency    string              `json:"currency"`
	CreatedAt   string              `json:"created_at"`
}

func handle(w http.ResponseWriter, r *http.Request) {
	n, _ := io.Copy(io.Discard, r.Body)
	o := order{
		Path:        r.URL.Path,
		Method:      r.Method,
		Query:       r.URL.Query(),
		User:        r.Header.Get("X-Flashgate-User"),
		Reservation: r.Header.Get("X-Flashgate-Reservation"),
		Sku:         r.Header.Get("X-Flashgate-Sku"),
		Headers:     len(r.Header),
		BodyBytes:   n,
		Currency:    "EUR",
		CreatedAt:   time.Now().UTC().Format(time.RFC3339Nano),
	}
	if o.User == "" {
		o.User = r.Header.Get("X-User-Id")
	}
	// Eight order lines derived from the path, so each request computes its own body.
	seed := len(r.URL.Path) + len(r.URL.RawQuery)
	for i := 0; i < 8; i++ {
		cents := 199 + (seed*31+i*97)%9800
		qty := 1 + (seed+i)%3
		o.Lines = append(o.Lines, line{
			SKU:       "sku-" + strconv.Itoa(seed*10+i),
			Name:      strings.Repeat("x", 12) + " item " + strconv.Itoa(i),
			UnitCents: cents,
			Quantity:  qty,
			Tags:      []string{"flash", "bench", "line-" + strconv.Itoa(i)},
		})
		o.TotalCents += cents * qty
	}
	body, err := json.Marshal(&o)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write(body)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:3000", "address to serve on (loopback)")
	flag.Parse()
	srv := &http.Server{Addr: *listen, Handler: http.HandlerFunc(handle), ReadHeaderTimeout: 30 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
