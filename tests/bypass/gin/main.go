// A Gin backend for tests/bypass_matrix.rs, built against Debian's
// golang-github-gin-gonic-gin-dev in GOPATH mode (no module downloads). Gin's defaults
// (release mode aside): it routes on the decoded path, redirects a trailing slash, and
// answers 404 to a method with no route. A Rack-style method override wraps the engine.
// Prints "LISTENING <port>" once bound to 127.0.0.1:0.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/gin-gonic/gin"
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

func header(c *gin.Context, name string) *string {
	vs := c.Request.Header.Values(name)
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

func buy(route string) gin.HandlerFunc {
	return func(c *gin.Context) {
		rec := record{
			Route:       route,
			Method:      c.Request.Method,
			Reservation: header(c, "X-Flashgate-Reservation"),
			XSku:        header(c, "X-Flashgate-Sku"),
			XQty:        header(c, "X-Flashgate-Quantity"),
		}
		switch route {
		case "path":
			rec.Sku = ptr(c.Param("sku"), true)
		case "query":
			rec.Sku = ptr(c.GetQuery("sku"))
			rec.Qty = qty(c.GetQuery("quantity"))
		case "header":
			rec.Sku = ptr(c.GetHeader("X-Sku"), c.GetHeader("X-Sku") != "")
			rec.Qty = qty(c.GetHeader("X-Qty"), c.GetHeader("X-Qty") != "")
		case "json":
			var body struct {
				Sku      string `json:"sku"`
				Quantity int    `json:"quantity"`
			}
			if err := c.ShouldBindJSON(&body); err == nil {
				rec.Sku = ptr(body.Sku, true)
				rec.Qty = qty(strconv.Itoa(body.Quantity), true)
			}
		}
		mu.Lock()
		seen = append(seen, rec)
		mu.Unlock()
		c.JSON(http.StatusOK, gin.H{"bought": true})
	}
}

// override applies a Rack/Laravel-style method override to a POST (Gin routes before any
// middleware runs, so it wraps the engine).
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
	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	for _, m := range []string{"POST", "PUT", "PATCH", "DELETE"} {
		r.Handle(m, "/api/flash/:sku/buy", buy("path"))
		r.Handle(m, "/api/flash-q/buy", buy("query"))
		r.Handle(m, "/api/flash-h/buy", buy("header"))
		r.Handle(m, "/api/flash-j/buy", buy("json"))
	}
	r.GET("/__seen", func(c *gin.Context) {
		mu.Lock()
		out := seen
		seen = []record{}
		mu.Unlock()
		c.JSON(http.StatusOK, out)
	})
	r.NoRoute(func(c *gin.Context) { c.String(http.StatusNotFound, "not found") })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("LISTENING %d\n", l.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	http.Serve(l, override(r))
}
