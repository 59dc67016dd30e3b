// An embedded Tomcat 10 backend for tests/bypass_matrix.rs (Debian libtomcat10-embed-java,
// Jackson for JSON). Servlet mappings as a servlet app would write them: `/api/flash/*` for
// the path route (its SKU from getPathInfo(), decoded and with `;params` removed by Tomcat),
// exact mappings for the other routes, getParameter() for the query route (query and a
// urlencoded form body together). A Spring-style hidden-method filter plus the override
// headers: a POST may become PUT, PATCH or DELETE. Prints "LISTENING <port>" once bound.
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.catalina.Context;
import org.apache.catalina.connector.Connector;
import org.apache.catalina.startup.Tomcat;

public class BuyServer {
    static final ObjectMapper JSON =
            new ObjectMapper().configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false);
    static final List<Map<String, Object>> SEEN = Collections.synchronizedList(new ArrayList<>());
    static final Set<String> BUY_METHODS = Set.of("POST", "PUT", "PATCH", "DELETE");

    public static class Order {
        public String sku;
        public int quantity;
    }

    static String joined(HttpServletRequest req, String name) {
        List<String> vs = Collections.list(req.getHeaders(name));
        return vs.isEmpty() ? null : String.join(", ", vs);
    }

    static String qty(String raw) {
        if (raw == null) return null;
        try {
            return Integer.toString(Integer.parseInt(raw));
        } catch (NumberFormatException e) {
            return raw;
        }
    }

    /** The method after a Spring-style hidden-method filter and the override headers. */
    static String method(HttpServletRequest req) {
        String m = req.getMethod();
        if (!"POST".equals(m)) return m;
        String o = null;
        for (String h : new String[] {"X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"}) {
            if (req.getHeader(h) != null) o = req.getHeader(h);
        }
        if (req.getParameter("_method") != null) o = req.getParameter("_method");
        if (o == null) return m;
        String u = o.toUpperCase();
        return Set.of("PUT", "PATCH", "DELETE").contains(u) ? u : m;
    }

    static class Buy extends HttpServlet {
        final String route;

        Buy(String route) {
            this.route = route;
        }

        @Override
        protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            String m = method(req);
            String sku = null;
            String quantity = null;
            switch (route) {
                case "path": {
                    String info = req.getPathInfo();
                    String[] seg = info == null ? new String[0] : info.split("/", -1);
                    if (seg.length != 3 || seg[1].isEmpty() || !"buy".equals(seg[2])) {
                        resp.sendError(404);
                        return;
                    }
                    sku = seg[1];
                    break;
                }
                case "query":
                    sku = req.getParameter("sku");
                    quantity = qty(req.getParameter("quantity"));
                    break;
                case "header":
                    sku = req.getHeader("X-Sku");
                    quantity = qty(req.getHeader("X-Qty"));
                    break;
                default:
                    break;
            }
            if (!BUY_METHODS.contains(m)) {
                resp.setHeader("Allow", "POST, PUT, PATCH, DELETE");
                resp.sendError(405);
                return;
            }
            if ("json".equals(route)) {
                try {
                    Order o = JSON.readValue(req.getInputStream(), Order.class);
                    sku = o.sku;
                    quantity = Integer.toString(o.quantity);
                } catch (IOException e) {
                    sku = null;
                }
            }
            Map<String, Object> rec = new LinkedHashMap<>();
            rec.put("route", route);
            rec.put("method", m);
            rec.put("reservation", joined(req, "X-Flashgate-Reservation"));
            rec.put("x_sku", joined(req, "X-Flashgate-Sku"));
            rec.put("x_qty", joined(req, "X-Flashgate-Quantity"));
            rec.put("sku", sku);
            rec.put("qty", quantity);
            SEEN.add(rec);
            resp.setContentType("application/json");
            resp.getWriter().write("{\"bought\":true}");
        }
    }

    static class Seen extends HttpServlet {
        @Override
        protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            List<Map<String, Object>> out;
            synchronized (SEEN) {
                out = new ArrayList<>(SEEN);
                SEEN.clear();
            }
            resp.setContentType("application/json");
            resp.getWriter().write(JSON.writeValueAsString(out));
        }
    }

    static class NotFound extends HttpServlet {
        @Override
        protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            resp.sendError(404);
        }
    }

    public static void main(String[] args) throws Exception {
        File base = Files.createTempDirectory("tomcat-bypass").toFile();
        Tomcat tomcat = new Tomcat();
        tomcat.setBaseDir(base.getAbsolutePath());
        Connector connector = new Connector();
        connector.setPort(0);
        connector.setProperty("address", "127.0.0.1");
        tomcat.setConnector(connector);
        Context ctx = tomcat.addContext("", base.getAbsolutePath());
        // No annotation scanning: nothing here uses it, and Debian ships jakarta.annotation
        // separately.
        ctx.setIgnoreAnnotations(true);
        String[][] servlets = {
            {"path", "/api/flash/*"},
            {"query", "/api/flash-q/buy"},
            {"header", "/api/flash-h/buy"},
            {"json", "/api/flash-j/buy"},
        };
        for (String[] s : servlets) {
            Tomcat.addServlet(ctx, s[0], new Buy(s[0]));
            ctx.addServletMappingDecoded(s[1], s[0]);
        }
        Tomcat.addServlet(ctx, "seen", new Seen());
        ctx.addServletMappingDecoded("/__seen", "seen");
        Tomcat.addServlet(ctx, "notfound", new NotFound());
        ctx.addServletMappingDecoded("/", "notfound");
        tomcat.start();
        System.out.println("LISTENING " + connector.getLocalPort());
        System.out.flush();
        tomcat.getServer().await();
    }
}
