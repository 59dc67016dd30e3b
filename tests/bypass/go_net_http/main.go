// A Go net/http backend for tests/bypass_matrix.rs: Go 1.22 ServeMux patterns, nothing
// but the standard library. Prints "LISTENING <port>" once bound to 127.0.0.1:0.
//
//	-mode strict   "POST /api/flash/{sku}/buy" (the mux answers 405 to other methods);
//	               query values from r.URL.Query()
//	-mode any      "/api/flash/{sku}/buy" (any method), Rack-style method override in
//	               front of the mux; query values from r.FormValue (a form body wins)
//
// Every buy handler records what it saw; GET /__seen returns and clears the records.
// Anything else is a 404 that records nothing.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
)

type record struct {
	Route       string  `json:"route"`
	Method      string  `json:"method"`
	Reservation *string `json:"reservation"`
	XSku        *string `json:"x_sku"`
	XQty        *string `json:"x_qty"`
	Sku         *string `json:"sku"`
	Qty         *string `json:"qty"`
}

var (
	mu   sync.Mutex
	seen = []record{}
)

func header(r *http.Request, name string) *string {
	vs := r.Header.Values(name)
	if len(vs) == 0 {
		return nil
	}
	v := strings.Join(vs, ", ")
	return &v
}

func ptr(s string, ok bool) *string {
	if !ok {
		return nil
	}
	return &s
}

// qty renders a quantity the way the handler would use it: an int, else the raw text.
func qty(raw string, ok bool) *string {
	if !ok {
		return nil
	}
	if n, err := strconv.Atoi(raw); err == nil {
		s := strconv.Itoa(n)
		return &s
	}
	return &raw
}

func buy(route string, form bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rec := record{
			Route:       route,
			Method:      r.Method,
			Reservation: header(r, "X-Flashgate-Reservation"),
			XSku:        header(r, "X-Flashgate-Sku"),
			XQty:        header(r, "X-Flashgate-Quantity"),
		}
		query := func(k string) (string, bool) {
			if form {
				v := r.FormValue(k)
				return v, v != ""
			}
			q := r.URL.Query()
			return q.Get(k), q.Has(k)
		}
		switch route {
		case "path":
			rec.Sku = ptr(r.PathValue("sku"), true)
		case "query":
			rec.Sku = ptr(query("sku"))
			rec.Qty = qty(query("quantity"))
		case "header":
			rec.Sku = ptr(r.Header.Get("X-Sku"), r.Header.Get("X-Sku") != "")
			rec.Qty = qty(r.Header.Get("X-Qty"), r.Header.Get("X-Qty") != "")
		case "json":
			var body struct {
				Sku      string `json:"sku"`
				Quantity int    `json:"quantity"`
			}
			if err := json.NewDecoder(r.Body).Decode(&body); err == nil {
				rec.Sku = ptr(body.Sku, true)
				rec.Qty = qty(strconv.Itoa(body.Quantity), true)
			}
		}
		mu.Lock()
		seen = append(seen, rec)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"bought":true}`))
	}
}

// override applies a Rack/Laravel-style method override to a POST: a header, or `_method`
// in the query or a form body.
func override(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			m := ""
			for _, h := range []string{"X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"} {
				if v := r.Header.Get(h); v != "" {
					m = v
				}
			}
			if v := r.URL.Query().Get("_method"); v != "" {
				m = v
			}
			ct := r.Header.Get("Content-Type")
			if strings.HasPrefix(ct, "application/x-www-form-urlencoded") || strings.HasPrefix(ct, "multipart/form-data") {
				r.ParseMultipartForm(1 << 20)
				if v := r.PostFormValue("_method"); v != "" {
					m = v
				}
			}
			if m != "" {
				r.Method = strings.ToUpper(m)
			}
		}
		next.ServeHTTP(w, r)
	})
}

func main() {
	mode := flag.String("mode", "strict", "strict | any")
	flag.Parse()
	mux := http.NewServeMux()
	prefix := "POST "
	form := false
	if *mode == "any" {
		prefix = ""
		form = true
	}
	mux.Handle(prefix+"/api/flash/{sku}/buy", buy("path", form))
	mux.Handle(prefix+"/api/flash-q/buy", buy("query", form))
	mux.Handle(prefix+"/api/flash-h/buy", buy("header", form))
	mux.Handle(prefix+"/api/flash-j/buy", buy("json", form))
	mux.HandleFunc("GET /__seen", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		out, _ := json.Marshal(seen)
		seen = []record{}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write(out)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "not found", http.StatusNotFound)
	})
	var h http.Handler = mux
	if *mode == "any" {
		h = override(mux)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("LISTENING %d\n", l.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	http.Serve(l, h)
}
